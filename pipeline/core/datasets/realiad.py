"""Real-IAD as published: per-category JSON split files over an image folder.

The root holds ``realiad_jsons/<category>.json`` (or another split set such as
``realiad_jsons_sv`` or ``realiad_jsons_fuiad_0.4``, also found one level down as the
archive unpacks it: ``realiad_jsons/realiad_jsons_sv/``) and the images at one resolution,
``realiad_1024/`` (or ``realiad_512``, ``realiad_256``, ``realiad_raw``). Each JSON file is
``{"meta": {"prefix", "normal_class"}, "train": [...], "test": [...]}``, each entry
``{"category", "anomaly_class", "image_path", "mask_path"}`` with paths relative to
``<images>/<prefix>``. Source: Tencent/AnomalyDetection_Real-IAD, ``README.md`` and
``datasets/explicit_dataset.py``.

Each entry is one camera view and becomes one row: ``train`` entries are references,
``test`` entries queries; ``anomaly_class`` equal to ``normal_class`` (``OK``) is label 0,
any other class label 1 with that class (``AK``, ``BX``, ...) as its defect type. The FUIAD
split sets (``realiad_jsons_fuiad_<ratio>``) hide anomalous images among the ``train``
entries, as the training loader of the official repository treats every train entry as
normal: such a reference keeps its class as defect type and gets a null label (the job
draws references labelled 0 or null). The
sample and the view go to pass-through columns ``sample_id`` and ``view``, read from the
file name ``<category>_<NNNN>_<OK|NG>_C<k>_<time>.jpg`` as the dataset's evaluation groups
them (sample key ``audiojack_0001_NG``, view ``C1``); a name of another form keeps its
folder as the sample id and a null view.
"""
from __future__ import annotations

import json
import posixpath
import re
from typing import Any, Optional

from pipeline.core.datasets.base import ReadOptions, Rows, Tree

NAME = "realiad"
JSONS = "realiad_jsons"
#: Image folders in the order one is chosen when the user names none.
IMAGE_FOLDERS = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw")
SPLITS = {"train": "reference", "test": "query"}
DEFAULT_NORMAL_CLASS = "OK"
LOOKS_LIKE = f"{JSONS}/<category>.json beside {' or '.join(IMAGE_FOLDERS)}/ (Real-IAD)"
#: The sample key of the dataset's evaluation (ADEval's --sample_key_pat in the official
#: repository's README) and the camera view after it.
_SAMPLE = re.compile(r"^([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_(C[0-9]+)_")


def _json_folder(tree: Tree, name: str) -> Optional[str]:
    for candidate in (tree.join(name), tree.join(JSONS, name)):
        if tree.isdir(candidate) and any(f.path.endswith(".json")
                                         for f in tree.listdir(candidate)[1]):
            return candidate
    return None


def detect(tree: Tree) -> bool:
    return _json_folder(tree, JSONS) is not None


def _image_folder(tree: Tree, name: Optional[str]) -> str:
    if name:
        folder = tree.join(name)
        if not tree.isdir(folder):
            raise ValueError(f"Real-IAD image folder {tree.uri(folder)} not found")
        return folder
    for candidate in IMAGE_FOLDERS:
        if tree.isdir(tree.join(candidate)):
            return tree.join(candidate)
    raise ValueError(f"Real-IAD root {tree.url!r} has no image folder "
                     f"({', '.join(IMAGE_FOLDERS)})")


def sample_and_view(image_path: str) -> tuple[str, Optional[str]]:
    """(sample id, camera view) of an entry's image path."""
    found = _SAMPLE.match(posixpath.basename(image_path))
    if found:
        return found.group(1), found.group(2)
    return posixpath.dirname(image_path), None


def _load(tree: Tree, path: str) -> dict[str, Any]:
    with tree.fs.open(path, "rb") as f:
        doc = json.loads(f.read().decode("utf-8"))
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list)
                                            for k in SPLITS):
        raise ValueError("expected an object with 'meta', 'train' and 'test' lists")
    return doc


def read(tree: Tree, rows: Rows, options: ReadOptions) -> None:
    split_set = options.realiad_jsons or JSONS
    jsons = _json_folder(tree, split_set)
    if jsons is None:
        raise ValueError(f"Real-IAD root {tree.url!r} has no JSON split folder {split_set!r} "
                         f"(looked in {split_set}/ and {JSONS}/{split_set}/)")
    images = _image_folder(tree, options.realiad_images)
    for json_file in [f for f in tree.listdir(jsons)[1] if f.path.endswith(".json")]:
        try:
            doc = _load(tree, json_file.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            rows.problems.add("unreadable", tree.uri(json_file.path),
                              f"unreadable split file ({exc}); its category is not read")
            continue
        meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
        prefix = str(meta.get("prefix") or "").strip("/")
        normal = str(meta.get("normal_class") or DEFAULT_NORMAL_CLASS)
        fallback_category = posixpath.splitext(posixpath.basename(json_file.path))[0]
        base = posixpath.join(images, prefix) if prefix else images
        entries = [(split, e) for split in SPLITS for e in doc[split]]
        if not tree.isdir(base):
            rows.problems.add("missing", tree.uri(base),
                              f"image folder of {tree.uri(json_file.path)} not found; its "
                              f"{len(entries)} entries are not read", count=len(entries))
            continue
        files = tree.find(base)
        for index, (split, entry) in enumerate(entries):
            where = f"{tree.uri(json_file.path)} {split}[{index}]"
            if not isinstance(entry, dict) or not entry.get("image_path"):
                rows.problems.add("bad_entry", where, "entry without an image_path")
                continue
            image_rel = str(entry["image_path"]).strip("/")
            image = files.get(image_rel)
            if image is None:
                rows.problems.add("missing", tree.uri(posixpath.join(base, image_rel)),
                                  f"image of {where} not found; no row")
                continue
            category = str(entry.get("category") or fallback_category)
            anomaly_class = str(entry.get("anomaly_class") or normal)
            anomalous = anomaly_class != normal
            # FUIAD split sets put anomalous images in train on purpose (noise the method is
            # not told about): a reference with a null label, its class kept as defect type.
            label = (1 if split == "test" else None) if anomalous else 0
            masks: tuple[str, ...] = ()
            mask_rel = entry.get("mask_path")
            if anomalous and split == "test" and mask_rel:
                mask = files.get(str(mask_rel).strip("/"))
                if mask is None:
                    rows.problems.add("missing", tree.uri(posixpath.join(base, str(mask_rel))),
                                      f"mask of {where} not found; its image gets none")
                else:
                    masks = (mask.path,)
            sample_id, view = sample_and_view(posixpath.join(prefix, image_rel))
            rows.add(image, category, SPLITS[split], label,
                     anomaly_class if anomalous else None, masks=masks,
                     sample_id=sample_id, view=view)
