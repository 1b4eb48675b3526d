"""A small real-photo anomaly set on disk, in MVTec layout, with its manifest and masks.

Each category is a "product line" of one scikit-image sample photograph
(``tests.model.scorers.photos.ProductLine``, the real-weights tests' generator): normal
images are crops with small random shifts, scale, brightness, contrast, blur and noise. An
anomalous image is a normal one with one square defect of a given kind: foreign material
(``pasted``: a patch of another photograph) or a structural change of the same material
(``rotated``, ``displaced``, ``scaled``, ``missing``; see ``photos``). The jitter is the
real-weights test's harder setting. Everything comes from scikit-image's bundled images (no
download) and seeded generators, so a seed gives the same files anywhere.

    <root>/real_photos/<category>/train/good/NNN.png                normal references
    <root>/real_photos/<category>/validation/good/NNN.png           normal calibration images
    <root>/real_photos/<category>/test/good/NNN.png                 normal queries
    <root>/real_photos/<category>/test/<kind>/NNN.png               anomalous queries
    <root>/real_photos/<category>/ground_truth/<kind>/NNN_mask.png  their defect masks
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from tests.model.scorers.photos import DEFECT_KINDS, INTRUDERS, ProductLine

DATASET = "real_photos"
#: category → the sample photograph it is a product line of (objects, textures, tissue).
PRODUCTS = {"cat": "chelsea", "cup": "coffee", "brick": "brick", "gravel": "gravel",
            "grass": "grass", "tissue": "immunohistochemistry"}
#: The intruders pasted into every product line: photographs none of the products is.
_OTHERS = (*INTRUDERS, "chelsea", "astronaut")
#: The real-weights test's harder jitter (tests/model/scorers/test_real_weights.py).
LINE = ProductLine(size=224, paste=0.14, noise=0.04, blur=1.5, brightness=0.15, contrast=0.15)


@dataclass(frozen=True)
class PhotoSet:
    """How many images each category has (``n_test_anomalous`` per defect kind;
    ``n_calibration`` normal images held out for calibrating decisions), the defect kinds,
    the images' side in pixels, and the generator seed."""

    categories: tuple[str, ...] = tuple(PRODUCTS)
    n_train: int = 8
    n_test_good: int = 6
    n_test_anomalous: int = 6
    size: int = 224
    seed: int = 0
    defects: tuple[str, ...] = DEFECT_KINDS
    n_calibration: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in PRODUCTS]
        if unknown or not self.categories:
            raise ValueError(f"categories must be among {', '.join(PRODUCTS)}, got "
                             f"{list(self.categories)}")
        bad = [d for d in self.defects if d not in DEFECT_KINDS]
        if bad or not self.defects or len(set(self.defects)) != len(self.defects):
            raise ValueError(f"defects must be distinct kinds among {', '.join(DEFECT_KINDS)},"
                             f" got {list(self.defects)}")
        if min(self.n_train, self.n_test_good, self.n_test_anomalous) < 1:
            raise ValueError("every split needs at least one image")
        if self.n_calibration < 0:
            raise ValueError(f"n_calibration must be 0 or more, got {self.n_calibration}")

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
        line = photo_set.line(category)
        rng = np.random.default_rng(zlib.crc32(f"{photo_set.seed}/{category}".encode()))
        base = os.path.join(dataset_root, category)
        images = [("train/good", line.normal(rng), None) for _ in range(photo_set.n_train)]
        images += [("test/good", line.normal(rng), None) for _ in range(photo_set.n_test_good)]
        for kind in photo_set.defects:
            for _ in range(photo_set.n_test_anomalous):
                image, box = line.defective(rng, kind)
                images.append((f"test/{kind}", image, box))
        # Drawn last: a set with calibration images has the same other images as one without.
        images += [("validation/good", line.normal(rng), None)
                   for _ in range(photo_set.n_calibration)]
        counts: dict[str, int] = {}
        for split, image, box in images:
            index = counts[split] = counts.get(split, -1) + 1
            _save(image, os.path.join(base, split), f"{index:03d}.png")
            if box is not None:
                top, left, side = box
                mask = np.zeros((image.height, image.width), np.uint8)
                mask[top:top + side, left:left + side] = 255
                _save(Image.fromarray(mask), os.path.join(base, "ground_truth", split[5:]),
                      f"{index:03d}_mask.png")
    return [(dataset_root, DATASET)]


def _save(image: Image.Image, folder: str, name: str) -> None:
    os.makedirs(folder, exist_ok=True)
    image.save(os.path.join(folder, name), format="PNG")


def write_photo_manifest(root: str, manifest: str,
                         photo_set: PhotoSet = PhotoSet()) -> pd.DataFrame:
    """Write the images under ``root`` and their manifest at ``manifest``; returns it."""
    frame = make_manifest(write_photo_images(root, photo_set))
    write_manifest(frame, manifest)
    return frame
