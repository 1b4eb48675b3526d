"""MVTec AD, and the datasets InCTRL's paper converts to its layout (VisA split by its
``split_csv/1cls.csv``, AITEX, ELPV, SDD, BrainMRI, HeadCT, ...).

``<root>/<category>/train/good/*`` are normal references, ``<category>/validation/good/*``
(where a tree has it, as MVTec LOCO AD and MVTec AD 2 do) normal images held out for
calibration, ``<category>/test/good/*`` normal queries and ``<category>/test/<defect>/*`` anomalous queries with their defect type. An
anomalous query's mask is ``<category>/ground_truth/<defect>/<name>_mask.png`` (MVTec AD) or
else ``<category>/ground_truth/<defect>/<name>.png`` (converted VisA keeps the image's name).
A mask that no image claims is reported.
"""
from __future__ import annotations

import logging
import posixpath
from typing import Optional

from pipeline.core.datasets.base import FileEntry, ReadOptions, Rows, Tree, stem

LOG = logging.getLogger(__name__)

NAME = "mvtec"
LOOKS_LIKE = ("<category>/train/good/ and <category>/test/<good|defect>/ (MVTec AD and the "
              "layouts converted to it)")

NORMAL = "good"
MASK_DIR = "ground_truth"
#: What follows an image's name in its mask's name, most specific first (MVTec AD, VisA).
MASK_SUFFIXES = ("_mask", "")


def categories(tree: Tree, has: tuple[str, ...]) -> list[str]:
    """Category folders of the root holding at least one of the relative paths ``has``."""
    dirs, _ = tree.listdir(tree.root)
    return [posixpath.basename(d) for d in dirs
            if posixpath.basename(d) != MASK_DIR
            and any(tree.isdir(posixpath.join(d, h)) for h in has)]


def detect(tree: Tree) -> bool:
    return bool(categories(tree, ("train/good", "test")))


class MaskFolder:
    """The masks of one folder by name, listed once; remembers which ones an image claimed
    so that the rest can be reported as masks without an image."""

    def __init__(self, rows: Rows, folder: str, suffixes: tuple[str, ...] = MASK_SUFFIXES) -> None:
        self._rows = rows
        self.folder = folder
        _, files = rows.tree.listdir(folder)
        self._masks = {stem(f.path): f.path for f in rows.image_files(files)}
        self._suffixes = suffixes
        self._claimed: set[str] = set()

    def find(self, image: str) -> Optional[str]:
        """The mask of ``image``, or None (logged at DEBUG: many datasets lack some)."""
        name = stem(image)
        for suffix in self._suffixes:
            if name + suffix in self._masks:
                self._claimed.add(name + suffix)
                return self._masks[name + suffix]
        LOG.debug("No ground-truth mask for %s in %s", image, self.folder)
        return None

    def report_unclaimed(self) -> None:
        for name, path in sorted(self._masks.items()):
            if name not in self._claimed:
                self._rows.problems.add("orphan_mask", self._rows.tree.uri(path),
                                        "mask without an image (no image of that name)")


def read(tree: Tree, rows: Rows, options: ReadOptions) -> None:
    found = categories(tree, ("train/good", "test"))
    if not found:
        raise ValueError(f"dataset root {tree.url!r} has no category with the expected layout "
                         f"{LOOKS_LIKE}")
    for category in found:
        cat = tree.join(category)
        for image in rows.images_in(posixpath.join(cat, "train", NORMAL), required=False):
            rows.add(image, category, "reference", 0)
        if tree.isdir(posixpath.join(cat, "validation", NORMAL)):
            for image in rows.images_in(posixpath.join(cat, "validation", NORMAL)):
                rows.add(image, category, "calibration", 0)
        test = posixpath.join(cat, "test")
        splits = [posixpath.basename(d) for d in tree.listdir(test)[0]]
        for split in splits:
            if split == MASK_DIR:
                continue
            images: list[FileEntry] = rows.images_in(posixpath.join(test, split))
            if split == NORMAL:
                for image in images:
                    rows.add(image, category, "query", 0)
                continue
            masks = MaskFolder(rows, posixpath.join(cat, MASK_DIR, split))
            for image in images:
                mask = masks.find(image.path)
                rows.add(image, category, "query", 1, split, masks=(mask,) if mask else ())
            masks.report_unclaimed()
        for defect_dir in tree.listdir(posixpath.join(cat, MASK_DIR))[0]:
            if posixpath.basename(defect_dir) not in splits:
                MaskFolder(rows, defect_dir).report_unclaimed()
