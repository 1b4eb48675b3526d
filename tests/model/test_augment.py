"""Reference rotations against a plain loop written from OpenCV's ``warpAffine`` as
AnomalyDINO's official code calls it (dammsi/AnomalyDINO src/utils.py: a rotation about the
image centre, bilinear, border ``BORDER_REFLECT_101``), and against exact quarter turns."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.augment import even_angles, rotate, rotations


def _reflect101(i: int, n: int) -> int:
    """OpenCV's BORDER_REFLECT_101 index: ``gfedcb|abcdefgh|gfedcba``."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return i if i < n else period - i


def _rotate_loop(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """(C, H, W): output pixel (r, c) = bilinear sample of the input at the inverse rotation
    of (c, r) about the grid's centre ((W−1)/2, (H−1)/2), counter-clockwise as seen."""
    ch, h, w = x.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    t = math.radians(degrees)
    out = torch.zeros_like(x)
    for r in range(h):
        for c in range(w):
            # inverse map: rotate (c − cx, r − cy) by −t in image coordinates (y down)
            dx, dy = c - cx, r - cy
            sx = cx + math.cos(t) * dx - math.sin(t) * dy
            sy = cy + math.sin(t) * dx + math.cos(t) * dy
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            acc = torch.zeros(ch)
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    acc += wy * wx * x[:, _reflect101(yy, h), _reflect101(xx, w)]
            out[:, r, c] = acc
    return out


@pytest.mark.parametrize("size", [(9, 9), (7, 11)])
@pytest.mark.parametrize("degrees", [45.0, 90.0, 135.0, 300.0])
def test_rotation_equals_the_warp_affine_loop(size, degrees):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = rotate(x, degrees)
    for b in range(2):
        assert torch.allclose(got[b], _rotate_loop(x[b], degrees), atol=1e-9)


def test_quarter_turns_are_exact_on_squares():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rotate(x, 180), torch.flip(x, [2, 3]), atol=1e-6)
    # counter-clockwise as seen: the right edge comes to the top
    assert torch.allclose(rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)), atol=1e-6)
    assert torch.equal(rotate(x, 0), x) and torch.equal(rotate(x, 360), x)


def test_rotations_stack_every_angle():
    assert even_angles(8) == (0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0)
    assert even_angles(1) == (0.0,)
    with pytest.raises(ValueError):
        even_angles(0)
    x = torch.rand(2, 3, 6, 6)
    out = rotations(x, (0.0, 90.0))
    assert out.shape == (2, 2, 3, 6, 6) and torch.equal(out[:, 0], x)
