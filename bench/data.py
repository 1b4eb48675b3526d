"""Synthetic benchmark inputs: distinct images on disk and a one-group manifest over them."""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.manifest import write_manifest

DATASET = "bench"
# Not a semantic class name, so the category gets InCTRL's full prompt ensemble.
CATEGORY = "widget"
FORMATS = {"png": "PNG", "jpg": "JPEG"}


def draw_image(index: int, size: int) -> Image.Image:
    """A distinct RGB image: a smooth random pattern plus fine noise (so PNG stays realistic)."""
    rng = np.random.default_rng([20240, index])
    coarse = rng.uniform(0, 255, (max(2, size // 32), max(2, size // 32), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    noisy = base.astype(np.int16) + rng.integers(-6, 7, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[fmt], **({"quality": 90} if fmt == "jpg" else {}))
    return buf.getvalue()


def write_image(job: tuple[str, int, int, str]) -> str:
    """Write image ``index`` at ``path`` unless it exists; ``job`` = (path, index, size, fmt)."""
    path, index, size, fmt = job
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(encode_image(draw_image(index, size), fmt))
        os.replace(tmp, path)
    return path


def write_images(folder: str, count: int, size: int, fmt: str, map_fn=map) -> list[str]:
    """``count`` distinct images ``folder/NNNNNN.<fmt>``; existing files are reused.

    ``map_fn`` may be a process pool's ``map`` to draw them in parallel.
    """
    os.makedirs(folder, exist_ok=True)
    jobs = [(os.path.join(folder, f"{i:06d}.{fmt}"), i, size, fmt) for i in range(count)]
    return list(map_fn(write_image, jobs))


def _group_rows(paths: list[str], references: int, category: str, id_prefix: str) -> list[dict]:
    """One category's rows: the first ``references`` images are normal references, the rest
    queries (every fourth labelled anomalous, so the summary has both classes)."""
    rows = []
    for i, uri in enumerate(paths):
        is_ref = i < references
        label = 0 if is_ref else int((i - references) % 4 == 3)
        rows.append({
            "image_uri": os.path.abspath(uri),
            "image_id": f"{id_prefix}{i:06d}",
            "dataset": DATASET,
            "category": category,
            "role": "reference" if is_ref else "query",
            "label": label,
            "defect_type": "synthetic" if label else None,
        })
    return rows


def interleaved_manifest(paths: list[str], groups: int, references: int, queries: int,
                         path: str) -> None:
    """``groups`` categories of ``references`` + ``queries`` images each (``paths`` in that
    order), rows shuffled as a manifest interleaving product lines would be."""
    per = references + queries
    if len(paths) < groups * per:
        raise ValueError(f"need {groups * per} images, got {len(paths)}")
    rows = [row for g in range(groups)
            for row in _group_rows(paths[g * per:(g + 1) * per], references,
                                   f"{CATEGORY}{g:04d}", f"g{g:04d}-")]
    frame = pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)
    write_manifest(frame, path)


def lines_manifest(paths: list[str], lines: int, references: int, queries: int,
                   path: str, shared_references: bool = False) -> None:
    """``lines`` product lines (each a dataset ``line<NNNN>`` with one category, as
    ``make-manifest --folder-per-line`` gives) sharing ``queries`` queries as evenly as they
    go, each with ``references`` normal references: its own, or with ``shared_references``
    the same ``references`` images (same ids) for every line, extracted once for all of them
    (every line still builds its own memory from them). ``paths`` hold the references
    first, then the queries. Rows shuffled, lines interleaved."""
    needed = (1 if shared_references else lines) * references + queries
    if len(paths) < needed:
        raise ValueError(f"need {needed} images, got {len(paths)}")
    n_refs = references if shared_references else lines * references
    refs, pool = paths[:n_refs], paths[n_refs:]
    rows, start = [], 0
    for line in range(lines):
        n = queries // lines + (1 if line < queries % lines else 0)
        own = refs if shared_references else refs[line * references:(line + 1) * references]
        group = _group_rows(own + pool[start:start + n], references, CATEGORY, f"l{line:04d}-")
        for i, row in enumerate(group):
            if shared_references and i < references:
                row["image_id"] = f"shared-ref{i}"
            rows.append(dict(row, dataset=f"line{line:04d}"))
        start += n
    frame = pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)
    write_manifest(frame, path)


def one_group_manifest(paths: list[str], references: int, path: str) -> None:
    """One dataset and category over ``paths`` (``_group_rows``)."""
    write_manifest(pd.DataFrame(_group_rows(paths, references, CATEGORY, "img")), path)
