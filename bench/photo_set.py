"""A small real-photo anomaly set on disk, in MVTec layout, with its manifest.

Each category is a "product line" of one scikit-image sample photograph
(``tests.model.scorers.photos.ProductLine``, the real-weights tests' generator): normal
images are crops with small random shifts, scale, brightness, contrast, blur and noise; an
anomalous image is a normal one with a square patch of another photograph pasted in. The
jitter is the real-weights test's harder setting. Everything comes from scikit-image's
bundled images (no download) and seeded generators, so a seed gives the same files anywhere.

    <root>/real_photos/<category>/train/good/NNN.png     normal references
    <root>/real_photos/<category>/test/good/NNN.png      normal queries
    <root>/real_photos/<category>/test/pasted/NNN.png    anomalous queries
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, replace

import pandas as pd

from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from tests.model.scorers.photos import INTRUDERS, ProductLine

DATASET = "real_photos"
DEFECT = "pasted"
#: category → the sample photograph it is a product line of (objects, then textures).
PRODUCTS = {"cat": "chelsea", "cup": "coffee", "brick": "brick", "gravel": "gravel"}
#: The intruders pasted into every product line: photographs none of the products is.
_OTHERS = (*INTRUDERS, "chelsea", "astronaut")
#: The real-weights test's harder jitter (tests/model/scorers/test_real_weights.py).
LINE = ProductLine(size=224, paste=0.14, noise=0.04, blur=1.5, brightness=0.15, contrast=0.15)


@dataclass(frozen=True)
class PhotoSet:
    """How many images each category has, their side in pixels, and the generator seed."""

    categories: tuple[str, ...] = tuple(PRODUCTS)
    n_train: int = 8
    n_test_good: int = 6
    n_test_anomalous: int = 6
    size: int = 224
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in PRODUCTS]
        if unknown or not self.categories:
            raise ValueError(f"categories must be among {', '.join(PRODUCTS)}, got "
                             f"{list(self.categories)}")
        if min(self.n_train, self.n_test_good, self.n_test_anomalous) < 1:
            raise ValueError("every split needs at least one image")

    def line(self, category: str) -> ProductLine:
        product = PRODUCTS[category]
        intruders = tuple(dict.fromkeys(p for p in _OTHERS if p != product))
        return replace(LINE, product=product, intruders=intruders, size=self.size)


def write_photo_images(root: str, photo_set: PhotoSet = PhotoSet()) -> list[tuple[str, str]]:
    """Write the set under ``root`` (a local folder); returns ``[(dataset_root, dataset)]``
    for ``make_manifest``. Same arguments → the same pixels. Use a fresh folder:
    ``make_manifest`` takes every image it finds there."""
    dataset_root = os.path.join(root, DATASET)
    for category in photo_set.categories:
        seed = zlib.crc32(f"{photo_set.seed}/{category}".encode())
        refs, tests, labels = photo_set.line(category).sample(
            photo_set.n_train, photo_set.n_test_good, photo_set.n_test_anomalous, seed)
        base = os.path.join(dataset_root, category)
        splits = [("train/good", im) for im in refs]
        splits += [("test/" + (DEFECT if y else "good"), im) for im, y in zip(tests, labels)]
        counts: dict[str, int] = {}
        for split, image in splits:
            index = counts[split] = counts.get(split, -1) + 1
            folder = os.path.join(base, split)
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, f"{index:03d}.png"), format="PNG")
    return [(dataset_root, DATASET)]


def write_photo_manifest(root: str, manifest: str,
                         photo_set: PhotoSet = PhotoSet()) -> pd.DataFrame:
    """Write the images under ``root`` and their manifest at ``manifest``; returns it."""
    frame = make_manifest(write_photo_images(root, photo_set))
    write_manifest(frame, manifest)
    return frame
