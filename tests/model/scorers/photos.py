"""A tiny "product line" of real photographs for the real-weights tests (scikit-image's
bundled sample images, no download).

Normal images are crops of one photograph with a small random shift, scale and brightness
change (an object on a conveyor); anomalous ones are normal images with a square patch of a
different photograph pasted in at a random place. Everything is drawn from one seeded
``numpy`` generator, so a seed gives the same images on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# Sample images scikit-image ships inside its wheel (readable offline).
PRODUCT = "chelsea"
INTRUDERS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo(name: str) -> Image.Image:
    """An RGB PIL image of ``skimage.data.<name>``."""
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]))


@dataclass(frozen=True)
class ProductLine:
    """Crops of ``product`` of side ``crop`` (a fraction of its short side), jittered by up to
    ``shift`` (fraction of the crop) and ``scale``, brightness by ``brightness``; pasted
    patches are ``paste`` (fraction of the output side) of an intruder photograph."""

    product: str = PRODUCT
    intruders: tuple[str, ...] = INTRUDERS
    size: int = 224
    crop: float = 0.8
    shift: float = 0.04
    scale: float = 0.04
    brightness: float = 0.06
    contrast: float = 0.0
    rotation: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    paste: float = 0.2

    def normal(self, rng: np.random.Generator) -> Image.Image:
        base = photo(self.product)
        w, h = base.size
        side = min(w, h) * self.crop * (1 + rng.uniform(-self.scale, self.scale))
        cx = w / 2 + rng.uniform(-self.shift, self.shift) * side
        cy = h / 2 + rng.uniform(-self.shift, self.shift) * side
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        angle = rng.uniform(-self.rotation, self.rotation)
        if angle:
            base = base.rotate(angle, Image.BILINEAR, center=(cx, cy))
        img = base.resize((self.size, self.size), Image.BILINEAR, box=box)
        if self.blur:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, self.blur)))
        arr = np.asarray(img, dtype=np.float32)
        gain = 1 + rng.uniform(-self.brightness, self.brightness)
        spread = 1 + rng.uniform(-self.contrast, self.contrast)
        arr = (arr - arr.mean()) * spread + arr.mean() * gain
        if self.noise:
            arr = arr + rng.normal(0, self.noise * 255, arr.shape)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))

    def anomalous(self, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int]]:
        """A normal image with a pasted patch, and the patch's (top, left, side) in pixels."""
        img = self.normal(rng).copy()
        intruder = photo(self.intruders[int(rng.integers(len(self.intruders)))])
        side = int(self.size * self.paste)
        iw, ih = intruder.size
        src_side = int(rng.uniform(0.2, 0.5) * min(iw, ih))
        sx, sy = int(rng.integers(0, iw - src_side)), int(rng.integers(0, ih - src_side))
        patch = intruder.resize((side, side), Image.BILINEAR,
                                box=(sx, sy, sx + src_side, sy + src_side))
        # keep the patch off the outer margin so the map's peak is not clipped by the border
        margin = self.size // 8
        top = int(rng.integers(margin, self.size - margin - side))
        left = int(rng.integers(margin, self.size - margin - side))
        img.paste(patch, (left, top))
        return img, (top, left, side)

    def sample(self, n_ref: int, n_normal: int, n_anomalous: int, seed: int):
        """References, and test images with labels (0 normal, 1 anomalous)."""
        rng = np.random.default_rng(seed)
        refs = [self.normal(rng) for _ in range(n_ref)]
        tests = [self.normal(rng) for _ in range(n_normal)]
        tests += [self.anomalous(rng)[0] for _ in range(n_anomalous)]
        labels = [0] * n_normal + [1] * n_anomalous
        return refs, tests, labels
