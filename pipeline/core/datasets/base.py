"""What every dataset reader shares: a tree to list (symbolic links followed, names kept as
written), the rows it yields, and the bad input it finds (one warning line each, counted
for make-manifest's closing line).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any, Optional

import fsspec

from pipeline.core.manifest import default_image_id

LOG = logging.getLogger(__name__)

#: File extensions (lower case, no dot) that make_manifest treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"}
)

#: The manifest columns every reader fills, in the order they are written.
MANIFEST_COLUMNS = (
    "image_uri",
    "image_id",
    "dataset",
    "category",
    "role",
    "label",
    "defect_type",
    "mask_uri",
)


def is_image_name(path: str) -> bool:
    """Whether a file name has an image extension (any case)."""
    return posixpath.splitext(path)[1][1:].lower() in IMAGE_EXTENSIONS


def stem(path: str) -> str:
    """The file name without its folder and extension."""
    return posixpath.splitext(posixpath.basename(path))[0]


# --------------------------------------------------------------------------------------------
# Problems: bad input, reported once each and counted
# --------------------------------------------------------------------------------------------

#: kind → (one, several) as the closing line says it.
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "unreadable": ("unreadable file", "unreadable files"),
    "mask_size": ("mask of another size than its image", "masks of another size than their image"),
    "orphan_mask": ("mask without an image", "masks without an image"),
    "empty_folder": ("empty or missing folder", "empty or missing folders"),
    "missing": ("listed file not found", "listed files not found"),
    "bad_entry": ("unusable split entry", "unusable split entries"),
    "ignored_image": ("image outside any line folder", "images outside any line folder"),
    "no_references": ("line without references", "lines without references"),
    "link_loop": ("folder reached again through a link", "folders reached again through links"),
}


class Problems:
    """Bad input found while building a manifest: each is logged once as a warning naming the
    file, and counted by kind for the closing line. Non-image files are only counted."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.other_files = 0

    def add(self, kind: str, path: str, detail: str, count: int = 1) -> None:
        """Report one problem of ``kind`` (a key of PROBLEM_KINDS) at ``path``."""
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}")
        self.counts[kind] += count
        LOG.warning("%s: %s", path, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``2 unreadable files, 1 empty or missing folder`` (or ``no problems found``), then the count
        of non-image files skipped, if any."""
        parts = [f"{n} {PROBLEM_KINDS[k][0] if n == 1 else PROBLEM_KINDS[k][1]}"
                 for k, n in sorted(self.counts.items(), key=lambda kv: list(PROBLEM_KINDS)
                                    .index(kv[0])) if n]
        text = ", ".join(parts) if parts else "no problems found"
        if self.other_files:
            text += (f"; {self.other_files} non-image file"
                     f"{'' if self.other_files == 1 else 's'} skipped")
        return text


# --------------------------------------------------------------------------------------------
# Listing a tree
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A listed file: its path on the tree's filesystem, and why it cannot be read (None when
    it looks readable: the target of a link exists, it is readable and not empty)."""

    path: str
    problem: Optional[str] = None


class Tree:
    """One folder (local path or fsspec URL) to read images from, and the tally its problems
    go to.

    Paths inside are the filesystem's own (no protocol); ``uri`` turns them back into what a
    manifest stores: a plain path for local files, a URL otherwise. Symbolic links are
    followed (fsspec lists them as neither file nor folder) and keep the name they were
    found under; hidden names (``.x``) are skipped.
    """

    def __init__(self, url: str, problems: Optional[Problems] = None) -> None:
        self.url = url
        self.problems = problems if problems is not None else Problems()
        self.fs, path = fsspec.core.url_to_fs(url)
        self.root = path.rstrip("/") or "/"
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(
            self.fs.protocol)
        self.local = "file" in protocols or "local" in protocols

    def uri(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path) if self.local else self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path) if self.local else self.fs.isfile(path)

    def listdir(self, path: str) -> tuple[list[str], list[FileEntry]]:
        """(subfolder paths, file entries) directly inside ``path``, each sorted by name; empty
        for a missing folder and for one that cannot be listed (reported)."""
        return self._list(path) or ([], [])

    def _list(self, path: str) -> Optional[tuple[list[str], list[FileEntry]]]:
        """listdir, or None (reported) when the folder exists but cannot be listed."""
        if not self.isdir(path):
            return [], []
        try:
            entries = self.fs.ls(path, detail=True)
        except OSError as exc:  # e.g. no permission to list it
            self.problems.add("unreadable", self.uri(path), f"cannot list this folder "
                              f"({type(exc).__name__}: {exc}); its images are not read")
            return None
        dirs, files = [], []
        for e in entries:
            name = e["name"].rstrip("/")
            if posixpath.basename(name).startswith(".") or name == path.rstrip("/"):
                continue
            kind = e.get("type")
            if kind == "directory" or (kind == "other" and self.local and os.path.isdir(name)):
                dirs.append(name)
            elif kind == "file" or kind == "other":
                files.append(FileEntry(name, self._problem(e)))
        return sorted(dirs), sorted(files, key=lambda f: f.path)

    def _problem(self, entry: dict[str, Any]) -> Optional[str]:
        name = entry["name"]
        if self.local:
            if entry.get("islink") and not os.path.exists(name):
                return "a symbolic link to nothing"
            if not os.path.isfile(name):
                return "not a regular file"
            if not os.access(name, os.R_OK):
                return "not readable (permission denied)"
            if os.path.getsize(name) == 0:
                return "an empty file"
            return None
        return "an empty file" if entry.get("size") == 0 else None

    def walk(self, path: str) -> Iterator[tuple[str, list[str], list[FileEntry]]]:
        """(folder, its subfolders, its files) for ``path`` and every folder below it, in
        name order; a folder reached again through a link (a loop, or a second name) is
        reported and not read twice, one that cannot be listed is reported and skipped."""
        seen: set[str] = set()
        stack = [path]
        while stack:
            folder = stack.pop()
            key = os.path.realpath(folder) if self.local else folder
            if key in seen:
                self.problems.add("link_loop", self.uri(folder), "folder already read under "
                             "another name (a symbolic link); not read again")
                continue
            seen.add(key)
            listed = self._list(folder)
            if listed is None:
                continue
            dirs, files = listed
            yield folder, dirs, files
            stack.extend(reversed(dirs))

    def find(self, path: str) -> dict[str, FileEntry]:
        """Every file below ``path`` by its path relative to ``path`` (posix separators)."""
        base = path.rstrip("/")
        return {posixpath.relpath(f.path, base): f
                for _, _, files in self.walk(base) for f in files}


def dataset_name_of(url: str) -> str:
    """The default dataset name of a root: its last path component."""
    protocol, path = fsspec.core.split_protocol(url)
    if protocol is None:
        path = os.path.abspath(path)
    name = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    if not name:
        raise ValueError(f"cannot derive a dataset name from {url!r}; pass one with --dataset")
    return name


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What some layouts need beyond their root.

    ``mask_dir``: where the union of an image's several masks is written (MVTec LOCO AD);
    ``realiad_jsons``: Real-IAD's split set (default ``realiad_jsons``);
    ``realiad_images``: Real-IAD's image folder (default: the first of realiad_1024, _512,
    _256, _raw that exists).
    """

    mask_dir: Optional[str] = None
    realiad_jsons: Optional[str] = None
    realiad_images: Optional[str] = None

    def combined_mask_uri(self, dataset: str, category: str, defect: str, name: str) -> str:
        """Where the union of the masks of ``<category>/test/<defect>/<name>.*`` goes."""
        if not self.mask_dir:
            raise ValueError(f"{dataset}/{category}/{defect}/{name} has several mask files; "
                             "their union needs a folder to be written to (mask_dir)")
        return posixpath.join(self.mask_dir.rstrip("/"), dataset, category, defect,
                              f"{name}.png")


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MaskCheck:
    """An image and its mask(s), whose sizes are compared once every row is known."""

    row: dict[str, Any]
    image: str
    masks: tuple[str, ...]
    #: where to write the union when there are several masks (MVTec LOCO AD)
    combined: Optional[str] = None
    #: False when the listing already found the image unreadable (and reported it)
    image_readable: bool = True


def image_files(files: list[FileEntry], problems: Problems) -> list[FileEntry]:
    """The image files of a listing; the others are counted as skipped non-image files."""
    images = [f for f in files if is_image_name(f.path)]
    problems.other_files += len(files) - len(images)
    return images


class Rows:
    """The rows one source yields, with its tree (and the tree's problem tally) and dataset
    name."""

    def __init__(self, tree: Tree, dataset: str) -> None:
        self.tree = tree
        self.dataset = dataset
        self.problems = tree.problems
        self.rows: list[dict[str, Any]] = []
        self.mask_checks: list[MaskCheck] = []

    def add(self, image: FileEntry | str, category: str, role: str, label: Optional[int],
            defect: Optional[str] = None, masks: tuple[str, ...] = (),
            combined: Optional[str] = None, **extra: Any) -> dict[str, Any]:
        """Add the row of one image; an unreadable one is reported and kept (the scoring job
        reports it again, per row, in its errors table)."""
        entry = image if isinstance(image, FileEntry) else FileEntry(image)
        if entry.problem:
            self.problems.add("unreadable", self.tree.uri(entry.path),
                              f"unreadable image ({entry.problem}); kept, the job will "
                              "report it")
        image_uri = self.tree.uri(entry.path)
        row = {
            "image_uri": image_uri,
            "image_id": default_image_id(image_uri),
            "dataset": self.dataset,
            "category": category,
            "role": role,
            "label": label,
            "defect_type": defect,
            "mask_uri": self.tree.uri(masks[0]) if len(masks) == 1 else None,
            **extra,
        }
        self.rows.append(row)
        if masks:
            self.mask_checks.append(MaskCheck(row, entry.path, tuple(masks), combined,
                                              image_readable=entry.problem is None))
        return row

    def image_files(self, files: list[FileEntry]) -> list[FileEntry]:
        """The image files of a listing; the others are counted as skipped."""
        return image_files(files, self.problems)

    def images_in(self, folder: str, *, required: bool = True) -> list[FileEntry]:
        """Image files directly inside ``folder``; an existing folder without any is reported
        as empty (a missing one too when ``required``)."""
        _, files = self.tree.listdir(folder)
        images = self.image_files(files)
        if not images and (required or self.tree.isdir(folder)):
            self.problems.add("empty_folder", self.tree.uri(folder),
                              "no images in this folder" if self.tree.isdir(folder)
                              else "folder not found")
        return images
