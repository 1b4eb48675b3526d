"""Manifests from image datasets as they ship and from plain folders of images.

A source is a :class:`DatasetRoot` (a benchmark's root folder read in its published
layout: MVTec AD and the layouts converted to it, VisA, MVTec LOCO AD, MVTec AD 2,
Real-IAD; see ``pipeline.core.datasets``) or :class:`PlainFolders` (unlabelled queries,
normal references and calibration images of one line, or of one line per subfolder).
Every path may be an fsspec URL.

Bad input never stops the build and is never dropped silently: each problem is one warning
naming the file and a count in :class:`ManifestBuild` (make-manifest's closing line).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

import pandas as pd

from pipeline.core.datasets import AUTO, layout_for
from pipeline.core.datasets.base import (IMAGE_EXTENSIONS, MANIFEST_COLUMNS, Problems,
                                         ReadOptions, Rows, Tree, dataset_name_of)
from pipeline.core.datasets.folders import (PlainFolders, read_folders,
                                            report_lines_without_references)
from pipeline.core.datasets.masks import check_masks

LOG = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "DatasetRoot", "ManifestBuild", "PlainFolders", "ReadOptions",
           "build_manifest", "make_manifest", "summarize"]


@dataclasses.dataclass(frozen=True)
class DatasetRoot:
    """A dataset's root folder; ``dataset`` defaults to its last path component and
    ``layout`` (``auto``) to the one its files show."""

    root: str
    dataset: Optional[str] = None
    layout: str = AUTO


Source = Union[DatasetRoot, PlainFolders]


@dataclasses.dataclass
class ManifestBuild:
    """A built manifest, the problems found on the way, and the layout read at each root."""

    frame: pd.DataFrame
    problems: Problems
    layouts: list[tuple[str, str]]


def _read_root(source: DatasetRoot, problems: Problems, options: ReadOptions) -> tuple[Rows, str]:
    tree = Tree(source.root, problems)
    if not tree.isdir(tree.root):
        raise ValueError(f"dataset root {source.root!r} does not exist or is not a directory")
    layout = layout_for(tree, source.layout)
    rows = Rows(tree, source.dataset or dataset_name_of(source.root))
    layout.read(tree, rows, options)
    if not rows.rows:
        raise ValueError(f"dataset root {source.root!r} read as {layout.name} "
                         f"({layout.looks_like}) gave no images")
    return rows, layout.name


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    rows = sorted(rows, key=lambda r: (r["dataset"], r["category"], r["image_uri"]))
    extra: list[str] = []
    for row in rows:
        extra.extend(k for k in row if k not in MANIFEST_COLUMNS and k not in extra)
    # Object columns keep None for missing values (pandas' str dtype would use NaN).
    columns = {
        c: pd.Series([r.get(c) for r in rows], dtype="Int64" if c == "label" else object)
        for c in (*MANIFEST_COLUMNS, *extra)
    }
    for c in extra:  # all null: still a string column in Parquet, not Arrow's null type
        if columns[c].isna().all():
            columns[c] = columns[c].astype("string")
    return pd.DataFrame(columns)


def build_manifest(sources: Sequence[Source], options: ReadOptions = ReadOptions()
                   ) -> ManifestBuild:
    """Read every source into one manifest.

    Roles: ``reference`` (normal prompt images, label 0), ``query`` (label 0, 1 or null for
    unlabelled images) and ``calibration`` (normal images held out from the references:
    MVTec LOCO AD's and MVTec AD 2's ``validation/good``, plain calibration folders).
    Rows are sorted by dataset, category and URI, so the same input always gives the same
    manifest; pass-through columns (Real-IAD's ``sample_id`` and ``view``, MVTec AD 2's
    ``split``) appear when a source has them.

    Raises:
        ValueError: no sources, a root or folder that does not exist, a root no layout
            matches (the message lists the layouts), or one that gives no images.
    """
    if not sources:
        raise ValueError("a manifest needs at least one dataset root or plain folder")
    problems = Problems()
    parts: list[Rows] = []
    folders: list[Rows] = []
    layouts: list[tuple[str, str]] = []
    for source in sources:
        if isinstance(source, PlainFolders):
            folders.extend(read_folders(source, problems))
        else:
            rows, layout = _read_root(source, problems, options)
            parts.append(rows)
            layouts.append((source.root, layout))
    report_lines_without_references(folders, problems)
    parts.extend(folders)
    for rows in parts:
        check_masks(rows.tree, rows.mask_checks)
    return ManifestBuild(_frame([r for rows in parts for r in rows.rows]), problems, layouts)


def make_manifest(roots: Sequence[tuple[str, Optional[str]]],
                  options: ReadOptions = ReadOptions()) -> pd.DataFrame:
    """The manifest of ``(root, dataset name or None)`` pairs, each root's layout recognised
    from its files (see :func:`build_manifest`)."""
    if not roots:
        raise ValueError("make_manifest needs at least one (root, dataset) pair")
    return build_manifest([DatasetRoot(root, name) for root, name in roots], options).frame


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
