"""Checks made before a job starts, so that a run fails in its first second, not after hours
of scoring."""
from __future__ import annotations

import uuid

import fsspec


class OutputNotWritableError(OSError):
    """The output location cannot be written."""


def check_writable(root: str) -> None:
    """Create ``root`` if needed, then write and remove a marker file in it through fsspec.

    Raises:
        OutputNotWritableError: naming ``root`` and the reason.
    """
    marker = f"{root.rstrip('/')}/_write_check-{uuid.uuid4().hex}"
    try:
        fs, path = fsspec.core.url_to_fs(marker)
        parent = path.rpartition("/")[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except (OSError, ValueError, ImportError) as exc:
        raise OutputNotWritableError(
            f"output {root} is not writable: {type(exc).__name__}: {exc}") from exc
