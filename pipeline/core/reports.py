"""Report files: a table written as Parquet, strict JSON and Markdown side by side.

The summary and the nightly drift report are written by :func:`write_report`, through fsspec
(local paths and ``gs://`` alike). :func:`jsonable` is the one place that makes values safe
for strict JSON.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

import fsspec
import numpy as np
import pandas as pd

LOG = logging.getLogger(__name__)

#: Keys of :func:`write_report`'s result, one per file.
PARQUET, JSON, MARKDOWN = "parquet", "json", "markdown"


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinite floats as None, numpy scalars as Python ones and dict
    keys as strings, recursively (lists and tuples become lists): what strict JSON
    (``allow_nan=False``) accepts."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(frame: pd.DataFrame, out_dir: str, name: str, markdown: str,
                 extra: dict | None = None) -> dict[str, str]:
    """Write ``name.parquet``, ``name.json`` and ``name.md`` into ``out_dir`` (created).

    The JSON is ``{"extra": extra, "records": [one object per row]}`` with NaN written as
    null, so run metadata (run id, model id) travels with the numbers. Returns the paths as
    ``{"parquet": ..., "json": ..., "markdown": ...}``.
    """
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    base = out_dir.rstrip("/")
    paths = {PARQUET: f"{base}/{name}.parquet", JSON: f"{base}/{name}.json",
             MARKDOWN: f"{base}/{name}.md"}
    with fsspec.open(paths[PARQUET], "wb") as f:
        frame.to_parquet(f, index=False)
    # to_json writes NaN / NA as null and numpy scalars as plain numbers.
    document = {"extra": jsonable(dict(extra or {})),
                "records": json.loads(frame.to_json(orient="records"))}
    with fsspec.open(paths[JSON], "w") as f:
        json.dump(document, f, indent=2, allow_nan=False, default=str)
    with fsspec.open(paths[MARKDOWN], "w") as f:
        f.write(markdown)
    LOG.debug("Wrote %s (%d rows) to %s", name, len(frame), base)
    return paths
