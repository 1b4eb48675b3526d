"""Checks made before a job starts, so that a run fails in its first second, not after hours
of scoring."""
from __future__ import annotations

import uuid

import fsspec


class OutputNotWritableError(OSError):
    """The output location cannot be written."""


def check_writable(root: str) -> None:
    """Write and remove a marker file in ``root`` through fsspec; folders the check had to
    create are removed again, so a refused run leaves nothing behind.

    Raises:
        OutputNotWritableError: naming ``root`` and the reason.
    """
    try:
        fs, path = fsspec.core.url_to_fs(root.rstrip("/"))
        created = []
        folder = path
        while folder and not fs.exists(folder):
            created.append(folder)
            parent = folder.rpartition("/")[0]
            if parent == folder:
                break
            folder = parent
        if created:
            fs.makedirs(path, exist_ok=True)
        marker = f"{path}/_write_check-{uuid.uuid4().hex}"
        with fs.open(marker, "wb") as f:
            f.write(b"ok")
        fs.rm(marker)
        for folder in created:  # deepest first
            if fs.exists(folder):
                fs.rmdir(folder)
    except (OSError, ValueError, ImportError) as exc:
        raise OutputNotWritableError(
            f"output {root} is not writable: {type(exc).__name__}: {exc}") from exc
