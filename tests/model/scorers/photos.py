"""A tiny "product line" of real photographs for the real-weights tests (scikit-image's
bundled sample images, no download).

Normal images are crops of one photograph with a small random shift, scale and brightness
change (an object on a conveyor). Defects are square regions of a normal image, of side
``paste`` × the image side, kept off the outer eighth of the image, of two families:

- foreign material: ``pasted``, a patch of a different photograph;
- structural changes of the same material: ``rotated`` (the region turned by 90°, 180° or
  270° in place), ``displaced`` (the region replaced by another region of the same image, at
  least one region side away), ``scaled`` (the central half of the region magnified ×2 over
  it) and ``missing`` (the region's texture removed: a strong Gaussian blur of itself, its
  colours kept).

Everything is drawn from one seeded ``numpy`` generator, so a seed gives the same images on
every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

#: Defect kinds: foreign material first, then structural changes of the same material.
FOREIGN = ("pasted",)
STRUCTURAL = ("rotated", "displaced", "scaled", "missing")
DEFECT_KINDS = FOREIGN + STRUCTURAL

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

    def _region(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A defect's square (top, left, side), off the outer eighth of the image."""
        side = int(self.size * self.paste)
        margin = self.size // 8
        top = int(rng.integers(margin, self.size - margin - side))
        left = int(rng.integers(margin, self.size - margin - side))
        return top, left, side

    def defective(self, rng: np.random.Generator,
                  kind: str) -> tuple[Image.Image, tuple[int, int, int]]:
        """A normal image with one defect of ``kind`` (``DEFECT_KINDS``), and the defect's
        (top, left, side) in pixels. ``pasted`` is ``anomalous`` (same draws)."""
        if kind == "pasted":
            return self.anomalous(rng)
        if kind not in STRUCTURAL:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
        img = self.normal(rng).copy()
        top, left, side = self._region(rng)
        box = (left, top, left + side, top + side)
        region = img.crop(box)
        if kind == "rotated":
            region = region.rotate(90 * int(rng.integers(1, 4)))
        elif kind == "displaced":
            # another region of the same image, at least one side away from this one
            while True:
                sy, sx = (int(v) for v in rng.integers(0, self.size - side, 2))
                if max(abs(sy - top), abs(sx - left)) >= side:
                    break
            region = img.crop((sx, sy, sx + side, sy + side))
        elif kind == "scaled":
            q = side // 4
            region = region.resize((side, side), Image.BILINEAR,
                                   box=(q, q, side - q, side - q))
        else:  # missing
            region = region.filter(ImageFilter.GaussianBlur(side / 4))
        img.paste(region, (left, top))
        return img, (top, left, side)

    def sample(self, n_ref: int, n_normal: int, n_anomalous: int, seed: int):
        """References, and test images with labels (0 normal, 1 anomalous)."""
        rng = np.random.default_rng(seed)
        refs = [self.normal(rng) for _ in range(n_ref)]
        tests = [self.normal(rng) for _ in range(n_normal)]
        tests += [self.anomalous(rng)[0] for _ in range(n_anomalous)]
        labels = [0] * n_normal + [1] * n_anomalous
        return refs, tests, labels
