"""Manifests from MVTec-AD / VisA-style folder trees.

``<root>/<category>/train/good/*`` become normal references, ``<category>/test/good/*``
normal queries and ``<category>/test/<defect>/*`` anomalous queries with their defect type.
An anomalous query's ground-truth mask, when the tree has one, is
``<category>/ground_truth/<defect>/<name>_mask.png`` (MVTec AD) or
``<category>/ground_truth/<defect>/<name>.png`` (VisA split into this layout by its
``split_csv/1cls.csv``, whose masks keep the image's name).
"""
from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import Any, Optional

import fsspec
import pandas as pd

from pipeline.core.manifest import default_image_id

LOG = logging.getLogger(__name__)

#: File extensions (lower case, no dot) that make_manifest treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"}
)

_NORMAL_DIR = "good"
_MASK_DIR = "ground_truth"
_SKIPPED_DIRS = frozenset({_MASK_DIR})
#: What follows an image's name in its mask's name, most specific first (MVTec AD, VisA).
_MASK_SUFFIXES = ("_mask", "")

_MANIFEST_COLUMNS = (
    "image_uri",
    "image_id",
    "dataset",
    "category",
    "role",
    "label",
    "defect_type",
    "mask_uri",
)


def _is_image_file(path: str) -> bool:
    _, ext = posixpath.splitext(path)
    return ext[1:].lower() in IMAGE_EXTENSIONS


def _subdirs(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Names of the immediate subdirectories of ``path``, sorted."""
    entries = fs.ls(path, detail=True)
    names = [
        posixpath.basename(e["name"].rstrip("/"))
        for e in entries
        if e["type"] == "directory"
    ]
    return sorted(n for n in names if not n.startswith("."))


def _image_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Image files directly inside ``path`` (no recursion), sorted."""
    if not fs.isdir(path):
        return []
    entries = fs.ls(path, detail=True)
    return sorted(
        e["name"]
        for e in entries
        if e["type"] == "file" and _is_image_file(e["name"])
    )


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _mask_finder(fs: fsspec.AbstractFileSystem, mask_dir: str) -> Callable[[str], Optional[str]]:
    """A lookup from an image path to the path of its mask in ``mask_dir`` (or None).

    ``mask_dir`` is listed once, so a remote tree costs one listing per defect type.
    """
    masks = {_stem(p): p for p in _image_files(fs, mask_dir)}

    def find(image_path: str) -> Optional[str]:
        stem = _stem(image_path)
        for suffix in _MASK_SUFFIXES:
            if stem + suffix in masks:
                return masks[stem + suffix]
        LOG.debug("No ground-truth mask for %s in %s", image_path, mask_dir)
        return None

    return find


def _has_layout(fs: fsspec.AbstractFileSystem, category_path: str) -> bool:
    return fs.isdir(posixpath.join(category_path, "train", _NORMAL_DIR)) or fs.isdir(
        posixpath.join(category_path, "test")
    )


def _scan_root(root: str, dataset: str) -> list[dict[str, Any]]:
    """Manifest rows for one MVTec-style tree ``<root>/<category>/{train,test}/...``."""
    fs, root_path = fsspec.core.url_to_fs(root)
    root_path = root_path.rstrip("/") or "/"
    if not fs.isdir(root_path):
        raise ValueError(f"dataset root {root!r} does not exist or is not a directory")
    is_local = "file" in (
        (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    )

    def uri(path: str) -> str:
        return path if is_local else fs.unstrip_protocol(path)

    rows: list[dict[str, Any]] = []
    categories = [
        c for c in _subdirs(fs, root_path)
        if c not in _SKIPPED_DIRS and _has_layout(fs, posixpath.join(root_path, c))
    ]
    if not categories:
        raise ValueError(
            f"dataset root {root!r} has no category with the expected layout "
            "<root>/<category>/train/good/ or <root>/<category>/test/<good|defect>/"
        )

    def add(path: str, category: str, role: str, label: int, defect: Optional[str],
            mask: Optional[str] = None) -> None:
        image_uri = uri(path)
        rows.append(
            {
                "image_uri": image_uri,
                "image_id": default_image_id(image_uri),
                "dataset": dataset,
                "category": category,
                "role": role,
                "label": label,
                "defect_type": defect,
                "mask_uri": None if mask is None else uri(mask),
            }
        )

    for category in categories:
        cat_path = posixpath.join(root_path, category)
        for path in _image_files(fs, posixpath.join(cat_path, "train", _NORMAL_DIR)):
            add(path, category, "reference", 0, None)
        test_path = posixpath.join(cat_path, "test")
        if not fs.isdir(test_path):
            continue
        for split in _subdirs(fs, test_path):
            if split in _SKIPPED_DIRS:
                continue
            split_path = posixpath.join(test_path, split)
            if split == _NORMAL_DIR:
                for path in _image_files(fs, split_path):
                    add(path, category, "query", 0, None)
                continue
            find_mask = _mask_finder(fs, posixpath.join(cat_path, _MASK_DIR, split))
            for path in _image_files(fs, split_path):
                add(path, category, "query", 1, split, find_mask(path))
    return rows


def _default_dataset_name(root: str) -> str:
    protocol, path = fsspec.core.split_protocol(root)
    if protocol is None:
        path = os.path.abspath(path)
    name = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    if not name:
        raise ValueError(f"cannot derive a dataset name from root {root!r}; pass one")
    return name


def make_manifest(roots: Sequence[tuple[str, Optional[str]]]) -> pd.DataFrame:
    """Build a manifest from MVTec-AD / VisA-style folder trees.

    For each ``(root, dataset_name)`` (name None → basename of root):
    ``<category>/train/good/*`` are references (label 0), ``<category>/test/good/*``
    normal queries (label 0) and ``<category>/test/<defect>/*`` anomalous queries
    (label 1, defect_type=<defect>, mask_uri=its ground-truth mask, see the module
    docstring; null where the tree has none). ``ground_truth`` folders and non-image
    files are not scanned for images. Rows are sorted by dataset, category and URI, so the same tree
    always gives the same manifest.

    Raises:
        ValueError: no roots, a root is missing, or it has no category with
            the expected layout.
    """
    if not roots:
        raise ValueError("make_manifest needs at least one (root, dataset) pair")
    rows: list[dict[str, Any]] = []
    for root, name in roots:
        rows.extend(_scan_root(root, name or _default_dataset_name(root)))
    rows.sort(key=lambda r: (r["dataset"], r["category"], r["image_uri"]))
    # Object columns keep None for missing values (pandas' str dtype would use NaN).
    columns = {
        c: pd.Series([r[c] for r in rows], dtype="Int64" if c == "label" else object)
        for c in _MANIFEST_COLUMNS
    }
    return pd.DataFrame(columns)


def summarize(df: pd.DataFrame) -> str:
    """One line: row count per dataset and role, e.g. 'mvtec: 10 query, 20 reference'."""
    if df.empty:
        return "no rows"
    counts = df.groupby(["dataset", "role"]).size()
    parts = []
    for dataset in sorted(df["dataset"].unique()):
        per_role = ", ".join(
            f"{n} {role}" for role, n in counts[dataset].sort_index().items()
        )
        parts.append(f"{dataset}: {per_role}")
    return "; ".join(parts)
