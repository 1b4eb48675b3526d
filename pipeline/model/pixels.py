"""The last step of every view's transform, PIL image → normalised float32 pixels, done in
numpy: the same IEEE float32 operations as torchvision's ``ToTensor`` then ``Normalize``
(uint8 → float32, ÷ 255, − mean, ÷ std; each correctly rounded), so the pixels are
bit-identical, but on the calling thread alone.

Each output value depends only on its channel and its uint8 input, so those operations run
once, on the 256 values of each channel, into a (3, 256) table; an image is then three table
lookups that write the (3, H, W) planes directly, with no whole-image float passes and no
transposed copy (2.3x the four numpy passes it replaced; bench/RESULTS.md, "session 5").

Why: torch splits each of those five whole-image passes (permute, convert, divide, subtract,
divide) over its intra-op threads, and on a two-core worker whose other thread is busy (the
model's forward, another process) every split waits for it: the torchvision tail cost 9 to 48
CPU-ms an image against 2 in numpy (bench/RESULTS.md, "bf16 on the CPU: the InCTRL job's
overhead"). ``host_normalizing`` swaps the pair inside a ``Compose``; inputs it does not
vouch for (a tensor, a mode other than RGB, a default dtype other than float32) go through
torchvision's own steps unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

#: torchvision (and open_clip) steps that turn a PIL image into a [0, 1] float tensor
_TO_TENSOR = ("ToTensor", "MaybeToTensor")


class NormalizedTensor:
    """PIL RGB image (H, W) → (3, H, W) float32 ``(x / 255 - mean) / std``, contiguous;
    anything else through ``to_tensor`` and ``normalize`` (the torchvision steps replaced).
    Picklable."""

    def __init__(self, to_tensor: Any, normalize: Any) -> None:
        self.to_tensor = to_tensor
        self.normalize = normalize
        self.mean = np.asarray(normalize.mean, dtype=np.float32)
        self.std = np.asarray(normalize.std, dtype=np.float32)
        self.table = (_uint8_table(self.mean, self.std)
                      if self.mean.shape == (3,) and self.std.shape == (3,) else None)

    def __call__(self, image: Any) -> torch.Tensor:
        if (getattr(image, "mode", None) != "RGB" or self.table is None
                or torch.get_default_dtype() != torch.float32
                or getattr(self.normalize, "inplace", False)):
            return self.normalize(self.to_tensor(image))
        rgb = np.asarray(image)  # (H, W, 3) uint8
        out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
        for channel in range(3):
            np.take(self.table[channel], rgb[..., channel], out=out[channel])
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        mean, std = (tuple(float(v) for v in a) for a in (self.mean, self.std))
        return f"NormalizedTensor(mean={mean}, std={std})"


def _uint8_table(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(3, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every uint8 ``v``, each step
    one correctly rounded float32 operation, in torchvision's order."""
    values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255)  # (1, 256)
    return ((values - mean[:, None]) / std[:, None]).astype(np.float32, copy=False)


def host_normalizing(transform: Any) -> Any:
    """``transform`` with each ``ToTensor`` (or open_clip's ``MaybeToTensor``) directly
    followed by ``Normalize`` replaced by one ``NormalizedTensor``; a transform that is not a
    torchvision ``Compose``, or has no such pair, is returned as it is. In place."""
    steps: Sequence[Any] | None = getattr(transform, "transforms", None)
    if not isinstance(steps, list):
        return transform
    out: list[Any] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        following = steps[i + 1] if i + 1 < len(steps) else None
        if (type(step).__name__ in _TO_TENSOR and following is not None
                and type(following).__name__ == "Normalize"):
            out.append(NormalizedTensor(step, following))
            i += 2
            continue
        out.append(step)
        i += 1
    transform.transforms = out
    return transform
