"""VisA as published: ``<root>/split_csv/1cls.csv`` over the original folder tree.

The CSV (columns ``object, split, label, image, mask``; paths relative to the root, such as
``candle/Data/Images/Normal/0000.JPG`` and ``candle/Data/Masks/Anomaly/000.png``) is the
dataset's one-class split: ``train`` rows are normal references, ``test`` rows queries,
``normal`` label 0 and ``anomaly`` label 1 (defect type ``anomaly``) with the row's mask.
Source: amazon-science/spot-diff, ``split_csv/1cls.csv`` and ``utils/prepare_data.py``.
"""
from __future__ import annotations

import csv
import io
import posixpath

from pipeline.core.datasets.base import ReadOptions, Rows, Tree

NAME = "visa"
SPLIT_CSV = "split_csv/1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
ROLES = {"train": "reference", "test": "query"}
LABELS = {"normal": 0, "anomaly": 1}
LOOKS_LIKE = f"{SPLIT_CSV} beside the object folders (VisA as published)"


def detect(tree: Tree) -> bool:
    return tree.isfile(tree.join(SPLIT_CSV))


def _read_csv(tree: Tree) -> list[dict[str, str]]:
    path = tree.join(SPLIT_CSV)
    with tree.fs.open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{tree.uri(path)} lacks column(s) {', '.join(missing)} (expected "
                         f"{', '.join(COLUMNS)})")
    return list(reader)


def read(tree: Tree, rows: Rows, options: ReadOptions) -> None:
    entries = _read_csv(tree)
    csv_uri = tree.uri(tree.join(SPLIT_CSV))
    listed: dict[str, dict] = {}  # object folder → its files, listed once

    def entry(relative: str):
        top = relative.split("/", 1)[0]
        if top not in listed:
            listed[top] = {posixpath.join(top, k): v
                           for k, v in tree.find(tree.join(top)).items()}
        return listed[top].get(relative)

    for line, raw in enumerate(entries, start=2):
        where = f"{csv_uri} line {line}"
        obj, split, label = (raw.get(c, "").strip() for c in ("object", "split", "label"))
        image_rel = (raw.get("image") or "").strip().lstrip("/")
        mask_rel = (raw.get("mask") or "").strip().lstrip("/")
        if split not in ROLES or label not in LABELS or not obj or not image_rel:
            rows.problems.add("bad_entry", where,
                              f"unusable row (object={obj!r}, split={split!r}, label={label!r}, "
                              f"image={image_rel!r}); expected split train|test, label "
                              "normal|anomaly and an image path")
            continue
        image = entry(image_rel)
        if image is None:
            rows.problems.add("missing", tree.uri(tree.join(image_rel)),
                              f"image listed in {where} not found; no row")
            continue
        masks: tuple[str, ...] = ()
        if LABELS[label] == 1 and mask_rel:
            mask = entry(mask_rel)
            if mask is None:
                rows.problems.add("missing", tree.uri(tree.join(mask_rel)),
                                  f"mask listed in {where} not found; its image gets none")
            else:
                masks = (mask.path,)
        rows.add(image, obj, ROLES[split], LABELS[label],
                 label if LABELS[label] == 1 else None, masks=masks)
