"""MVTec LOCO AD as published.

``<category>/train/good/*`` are normal references, ``<category>/validation/good/*`` normal
images held out for calibration (role ``calibration``), ``<category>/test/good/*`` normal
queries, and ``<category>/test/{logical_anomalies, structural_anomalies}/*`` anomalous
queries whose defect type keeps that split. An anomalous image's ground truth is a folder,
``<category>/ground_truth/<defect>/<name>/``, of one PNG per defect region: one mask is used
as it is, several are combined into one (their union) under the manifest's mask folder.
"""
from __future__ import annotations

import posixpath

from pipeline.core.datasets.base import ReadOptions, Rows, Tree, stem
from pipeline.core.datasets.mvtec import MASK_DIR, NORMAL, categories

NAME = "mvtec_loco"
ANOMALY_SPLITS = ("logical_anomalies", "structural_anomalies")
LOOKS_LIKE = ("<category>/test/logical_anomalies/ or structural_anomalies/, "
              "<category>/validation/good/ (MVTec LOCO AD)")


def detect(tree: Tree) -> bool:
    return bool(categories(tree, tuple(f"test/{s}" for s in ANOMALY_SPLITS)))


def read(tree: Tree, rows: Rows, options: ReadOptions) -> None:
    found = categories(tree, tuple(f"test/{s}" for s in ANOMALY_SPLITS) + ("train/good",))
    for category in found:
        cat = tree.join(category)
        for image in rows.images_in(posixpath.join(cat, "train", NORMAL)):
            rows.add(image, category, "reference", 0)
        for image in rows.images_in(posixpath.join(cat, "validation", NORMAL), required=False):
            rows.add(image, category, "calibration", 0)
        test = posixpath.join(cat, "test")
        for image in rows.images_in(posixpath.join(test, NORMAL)):
            rows.add(image, category, "query", 0)
        for split in [posixpath.basename(d) for d in tree.listdir(test)[0]]:
            if split == NORMAL:
                continue
            truth = posixpath.join(cat, MASK_DIR, split)
            mask_dirs = {posixpath.basename(d): d for d in tree.listdir(truth)[0]}
            for image in rows.images_in(posixpath.join(test, split)):
                name = stem(image.path)
                masks: tuple[str, ...] = ()
                if name in mask_dirs:
                    masks = tuple(f.path for f in rows.image_files(
                        tree.listdir(mask_dirs.pop(name))[1]))
                    if not masks:
                        rows.problems.add("empty_folder", tree.uri(posixpath.join(truth, name)),
                                          "no mask in this ground-truth folder")
                combined = None
                if len(masks) > 1:
                    combined = options.combined_mask_uri(rows.dataset, category, split, name)
                rows.add(image, category, "query", 1, split, masks=masks, combined=combined)
            for name, folder in sorted(mask_dirs.items()):
                rows.problems.add("orphan_mask", tree.uri(folder),
                                  "ground-truth folder without an image of that name")
