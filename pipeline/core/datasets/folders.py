"""Plain folders of images without labels: a night's captures and known-good parts.

Every image under a queries folder (subfolders included) is a query with a null label,
every image under a references folder a normal reference (label 0) and every image under a
calibration folder a normal image held out from the references (role ``calibration``).
With ``folder_per_line`` each given folder holds one subfolder per line (product line):
the subfolder's name is that line's dataset, matched by name across queries, references
and calibration.
"""
from __future__ import annotations

import dataclasses
import posixpath
from typing import Optional

from pipeline.core.datasets.base import Problems, Rows, Tree, image_files

#: role → label of its images
ROLE_LABELS = {"query": None, "reference": 0, "calibration": 0}


@dataclasses.dataclass(frozen=True)
class PlainFolders:
    """One line's folders (or, with ``folder_per_line``, parents of one folder per line)."""

    dataset: Optional[str] = None
    queries: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    calibration: tuple[str, ...] = ()
    category: Optional[str] = None
    folder_per_line: bool = False

    def __post_init__(self) -> None:
        if not (self.queries or self.references or self.calibration):
            raise ValueError("plain folders need at least one queries, references or "
                             "calibration folder")
        if self.folder_per_line and self.dataset:
            raise ValueError(f"with one folder per line the subfolders name the datasets; "
                             f"dataset {self.dataset!r} cannot be given too")
        if not self.folder_per_line and not self.dataset:
            raise ValueError("plain folders need a dataset name (or one folder per line)")

    def by_role(self) -> dict[str, tuple[str, ...]]:
        return {"query": self.queries, "reference": self.references,
                "calibration": self.calibration}


def _open(url: str, problems: Problems) -> Tree:
    tree = Tree(url, problems)
    if not tree.isdir(tree.root):
        raise ValueError(f"folder {url!r} does not exist or is not a folder")
    return tree


def _read_folder(tree: Tree, folder: str, rows: Rows, role: str, category: str) -> None:
    """Rows for every image under ``folder``; empty folders are reported."""
    count = 0
    for path, dirs, files in tree.walk(folder):
        images = image_files(files, rows.problems)
        if not images and not dirs:
            rows.problems.add("empty_folder", tree.uri(path), "no images in this folder")
        for image in images:
            rows.add(image, category, role, ROLE_LABELS[role])
        count += len(images)
    if count == 0 and tree.listdir(folder)[0]:
        rows.problems.add("empty_folder", tree.uri(folder), "no images under this folder")


def read_folders(source: PlainFolders, problems: Problems) -> list[Rows]:
    """The rows of one PlainFolders source, one Rows per (folder, line)."""
    out: list[Rows] = []
    for role, urls in source.by_role().items():
        for url in urls:
            tree = _open(url, problems)
            if source.folder_per_line:
                dirs, files = tree.listdir(tree.root)
                for image in image_files(files, problems):
                    problems.add("ignored_image", tree.uri(image.path),
                                 "image outside any line folder; no row")
                if not dirs:
                    problems.add("empty_folder", tree.uri(tree.root), "no line folders in "
                                 "this folder")
                parts = [(posixpath.basename(d), d) for d in dirs]
            else:
                parts = [(source.dataset, tree.root)]
            for line, folder in parts:
                rows = Rows(tree, line)
                _read_folder(tree, folder, rows, role, source.category or line)
                out.append(rows)
    return out


def report_lines_without_references(parts: list[Rows], problems: Problems) -> None:
    """One warning per line (dataset) with queries but no reference image in any folder."""
    roles: dict[str, set[str]] = {}
    where: dict[str, str] = {}  # line → its first queries folder, named in the warning
    for rows in parts:
        for row in rows.rows:
            roles.setdefault(row["dataset"], set()).add(row["role"])
            if row["role"] == "query":
                where.setdefault(row["dataset"], posixpath.dirname(row["image_uri"]))
    for line, found in sorted(roles.items()):
        if "query" in found and "reference" not in found:
            problems.add("no_references", where[line],
                         f"line {line!r} has queries but no reference images: only "
                         "zero-shot scorers (--k 0) can score it")
