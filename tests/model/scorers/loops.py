"""Plain-loop versions of the operations the CNN scorers vectorise, written from their
definitions (one output element at a time), for the tests to compare against."""
from __future__ import annotations

import math

import torch


def bilinear_loop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) → (C, H, W), bilinear with half-pixel centres (align_corners=False): output
    pixel i samples source coordinate (i + ½)·h/H − ½, clamped at 0 and at the last pixel."""
    c, h, w = x.shape
    out = torch.zeros(c, *size, dtype=x.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            sy = max((i + 0.5) * h / size[0] - 0.5, 0.0)
            sx = max((j + 0.5) * w / size[1] - 0.5, 0.0)
            y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = sy - y0, sx - x0
            out[:, i, j] = ((1 - dy) * (1 - dx) * x[:, y0, x0] + (1 - dy) * dx * x[:, y0, x1]
                            + dy * (1 - dx) * x[:, y1, x0] + dy * dx * x[:, y1, x1])
    return out


def nearest_loop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) → (C, H, W): output pixel (i, j) copies source (⌊i·h/H⌋, ⌊j·w/W⌋)."""
    c, h, w = x.shape
    out = torch.zeros(c, *size, dtype=x.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, i, j] = x[:, i * h // size[0], j * w // size[1]]
    return out


def adaptive_avg_loop(v: torch.Tensor, n: int) -> torch.Tensor:
    """(C,) → (n,): bin i averages v[⌊iC/n⌋ : ⌈(i+1)C/n⌉]."""
    c = v.shape[0]
    return torch.stack([v[(i * c) // n: math.ceil((i + 1) * c / n)].mean() for i in range(n)])


def neighbourhood_mean_loop(x: torch.Tensor) -> torch.Tensor:
    """(C, h, w): each position the mean of the existing positions of its 3×3 neighbourhood."""
    c, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            cells = [x[:, a, b] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                     if 0 <= a < h and 0 <= b < w]
            out[:, i, j] = torch.stack(cells).mean(0)
    return out


def nearest_distance_loop(q: torch.Tensor, bank: torch.Tensor) -> tuple[float, int]:
    """min_j ‖q − bank_j‖ and its argmin, one row at a time."""
    best, arg = math.inf, -1
    for j in range(bank.shape[0]):
        d = float(torch.sqrt(((q - bank[j]) ** 2).sum()))
        if d < best:
            best, arg = d, j
    return best, arg
