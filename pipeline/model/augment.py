"""Image-space augmentations of reference images, on preprocessed pixel tensors (pure torch).

Some scorers enlarge a group's normal memory with transformed copies of its references
(AnomalyDINO rotates them); the transforms act on the model input, after its own resize and
normalisation. Bilinear interpolation is linear with weights summing to one, so it commutes
with the per-channel normalisation: rotating normalised pixels equals normalising rotated
ones.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def rotate(pixels: torch.Tensor, degrees: float) -> torch.Tensor:
    """Each image turned by ``degrees`` (counter-clockwise as seen) about the centre of its
    pixel grid, on the same canvas: bilinear, the border mirrored about the edge pixels
    (OpenCV's default ``BORDER_REFLECT_101``, which ``cv2.warpAffine`` uses).

    pixels: (B, C, H, W) → (B, C, H, W)
    """
    b, _, h, w = pixels.shape
    if degrees % 360 == 0:
        return pixels.clone()
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    # Output pixel (x, y) samples the input at R⁻¹ (x − c) + c in pixel units, written in the
    # normalised coordinates of align_corners=True (−1, 1 at the outer pixel centres).
    sx, sy = max(w - 1, 1) / 2, max(h - 1, 1) / 2
    theta = torch.tensor([[cos, -sin * sy / sx, 0.0],
                          [sin * sx / sy, cos, 0.0]], dtype=pixels.dtype, device=pixels.device)
    grid = F.affine_grid(theta.expand(b, 2, 3), list(pixels.shape), align_corners=True)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=True)


def rotations(pixels: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
    """Every image at every angle: (B, C, H, W) → (B, len(angles), C, H, W)."""
    return torch.stack([rotate(pixels, a) for a in angles], dim=1)


def even_angles(count: int) -> tuple[float, ...]:
    """``count`` angles evenly around the circle from 0 (8: 0, 45, ..., 315)."""
    if count < 1:
        raise ValueError(f"need at least one angle, got {count}")
    return tuple(360.0 * i / count for i in range(count))
