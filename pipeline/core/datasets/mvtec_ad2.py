"""MVTec AD 2 as published.

``<category>/train/good/*`` are normal references, ``<category>/validation/good/*`` normal
images held out for calibration (role ``calibration``), ``<category>/test_public/good/*``
normal queries and ``<category>/test_public/bad/*`` anomalous queries (defect type ``bad``)
with their masks at ``<category>/test_public/ground_truth/bad/<name>_mask.png``. The private
test sets (``test_private/``, ``test_private_mixed/``) ship without labels: their images
are unlabelled queries. Every row carries the published split folder in a pass-through
column ``split``, so the test sets can be told apart in the results.
"""
from __future__ import annotations

import posixpath

from pipeline.core.datasets.base import ReadOptions, Rows, Tree
from pipeline.core.datasets.mvtec import MASK_DIR, NORMAL, MaskFolder, categories

NAME = "mvtec_ad2"
PUBLIC = "test_public"
PRIVATE = ("test_private", "test_private_mixed")
ANOMALOUS = "bad"
LOOKS_LIKE = "<category>/test_public/{good,bad,ground_truth}/ (MVTec AD 2)"


def detect(tree: Tree) -> bool:
    return bool(categories(tree, (PUBLIC,)))


def read(tree: Tree, rows: Rows, options: ReadOptions) -> None:
    for category in categories(tree, (PUBLIC, "train/good") + PRIVATE):
        cat = tree.join(category)
        for image in rows.images_in(posixpath.join(cat, "train", NORMAL)):
            rows.add(image, category, "reference", 0, split="train")
        for image in rows.images_in(posixpath.join(cat, "validation", NORMAL), required=False):
            rows.add(image, category, "calibration", 0, split="validation")
        public = posixpath.join(cat, PUBLIC)
        for image in rows.images_in(posixpath.join(public, NORMAL)):
            rows.add(image, category, "query", 0, split=PUBLIC)
        masks = MaskFolder(rows, posixpath.join(public, MASK_DIR, ANOMALOUS), ("_mask",))
        for image in rows.images_in(posixpath.join(public, ANOMALOUS)):
            mask = masks.find(image.path)
            rows.add(image, category, "query", 1, ANOMALOUS, masks=(mask,) if mask else (),
                     split=PUBLIC)
        masks.report_unclaimed()
        for private in PRIVATE:
            for image in rows.images_in(posixpath.join(cat, private), required=False):
                rows.add(image, category, "query", None, split=private)
