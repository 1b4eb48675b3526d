"""Reading a built manifest back as comparable tuples, paths relative to the tree."""
from __future__ import annotations

import os

import pandas as pd


def _rel(path, root: str):
    return None if path is None else os.path.relpath(path, root)


def rows_of(df: pd.DataFrame, root: str, *extra: str) -> set[tuple]:
    """{(image, category, role, label, defect_type, mask, *extra)} with paths relative to
    ``root`` and labels as int or None."""
    out = set()
    for r in df.to_dict("records"):
        label = None if pd.isna(r["label"]) else int(r["label"])
        out.add((_rel(r["image_uri"], root), r["category"], r["role"], label, r["defect_type"],
                 _rel(r["mask_uri"], root), *(r[c] for c in extra)))
    return out
