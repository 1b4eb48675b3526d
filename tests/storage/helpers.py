"""Shared by the storage tests: a tiny manifest, a job config, and the three ways users read
a table back (pyarrow, pandas, DuckDB), both plainly (the hive folders) and through the
commit records (``current_files``)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

from pipeline.core.config import ScoreConfig
from pipeline.core.layout import PARTITIONING, current_files
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, tiny_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIVE_STRINGS = pads.partitioning(pa.schema([("dataset", pa.string()),
                                            ("run_date", pa.string())]), flavor="hive")


def tiny_manifest(folder: str, datasets: list[str], *, queries: int = 1,
                  references: int = 1) -> str:
    """A manifest of 16x16 random images: ``references`` + ``queries`` per dataset."""
    rng = np.random.default_rng(0)
    rows = []
    os.makedirs(folder, exist_ok=True)
    for d, dataset in enumerate(datasets):
        for i in range(references + queries):
            path = os.path.join(folder, f"img-{d}-{i}.png")
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            query = i >= references
            rows.append(dict(image_uri=path, dataset=dataset, category="c",
                             role="query" if query else "reference", label=int(query),
                             image_id=f"q{d}-{i}"))
    manifest = os.path.join(folder, "manifest.parquet")
    write_manifest(pd.DataFrame(rows), manifest)
    return manifest


def config(manifest: str, output: str, run_date: str, run_id: str) -> ScoreConfig:
    return ScoreConfig(manifest=manifest, output=output, k=1, seeds=(0,), backbone=tiny_spec(),
                       batch_size=4, run_date=run_date, run_id=run_id)


def cli_args(manifest: str, output: str, run_date: str, run_id: str) -> list[str]:
    """The same job as :func:`config` on the command line."""
    return ["score", "--manifest", manifest, "--output", output, "--run-date", run_date,
            "--run-id", run_id, "--k", "1", "--seeds", "0", "--batch-size", "4",
            "--backbone", TINY_BACKBONE, "--pretrained", TINY_PRETRAINED]


def child(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m tests.storage.killer ARGS`` from the repository root."""
    return subprocess.Popen([sys.executable, "-m", "tests.storage.killer", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def rows(table: pa.Table, columns: list[str]) -> list[tuple]:
    """The rows of ``columns`` as sorted tuples (None sorts first)."""
    data = zip(*(table[c].to_pylist() for c in columns))
    return sorted(data, key=lambda r: tuple((v is not None, str(v)) for v in r))


def plain_pyarrow(output: str, table: str, filesystem=None) -> pa.Table:
    """What a plain hive reader sees in ``OUT/<table>``."""
    root = f"{output.rstrip('/')}/{table}"
    if filesystem is not None:
        root = root.split("://", 1)[1]
    return pads.dataset(root, format="parquet", partitioning=HIVE_STRINGS,
                        filesystem=filesystem).to_table()


def recorded_pyarrow(output: str, table: str, filesystem=None) -> pa.Table:
    """The README's consistent read: the files in force, with hive partitioning."""
    files = current_files(output, table)
    base = f"{output.rstrip('/')}/{table}"
    if filesystem is not None:
        files = [f.split("://", 1)[1] for f in files]
        base = base.split("://", 1)[1]
    return pads.dataset(files, format="parquet", partitioning=PARTITIONING,
                        partition_base_dir=base, filesystem=filesystem).to_table()


def recorded_pandas(output: str, table: str, **kwargs) -> pd.DataFrame:
    return pd.read_parquet(current_files(output, table), partitioning=PARTITIONING, **kwargs)


def recorded_duckdb(output: str, table: str, columns: str, filesystem=None) -> list[tuple]:
    import duckdb

    con = duckdb.connect()
    if filesystem is not None:
        con.register_filesystem(filesystem)
    files = current_files(output, table)
    return sorted(con.sql(f"SELECT {columns} FROM read_parquet({files!r}, hive_partitioning=true,"
                          f" hive_types_autocast=false)").fetchall(), key=str)
