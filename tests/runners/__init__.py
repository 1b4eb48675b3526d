"""Helpers shared by the runner tests: one small manifest and one DirectRunner baseline.

The baseline job is computed once per test session (whichever module asks first) so that
the Dask and Portable tests each pay only for their own run.
"""
from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score

RUN_DATE = "2024-01-02"
KEY = ["image_id", "seed"]


def score_config(manifest: str, output: str) -> ScoreConfig:
    """The job every runner test scores: tiny backbone, two seeds, small batches."""
    return ScoreConfig(manifest=manifest, output=output, k=2, seeds=(0, 1),
                       backbone=tiny_spec(), batch_size=4, run_date=RUN_DATE, run_id="runners")


@functools.lru_cache(maxsize=1)
def workspace() -> str:
    """A folder with the demo images (26 rows: 10 references, 16 queries) and its manifest."""
    root = tempfile.mkdtemp(prefix="inctrl-runners-")
    pairs = generate_demo(os.path.join(root, "data"), image_size=32, n_train=2, n_test_good=1,
                          n_test_defect_per_type=1)
    write_manifest(make_manifest(pairs), os.path.join(root, "manifest.parquet"))
    return root


def manifest_path() -> str:
    return os.path.join(workspace(), "manifest.parquet")


@functools.lru_cache(maxsize=1)
def direct_output() -> str:
    """The DirectRunner's output for the shared manifest (computed once)."""
    out = os.path.join(workspace(), "direct")
    run_score(score_config(manifest_path(), out), [])
    return out


def read_scores(output: str) -> pd.DataFrame:
    table = pads.dataset(f"{output}/scores", format="parquet", partitioning="hive").to_table()
    return table.to_pandas().sort_values(KEY).reset_index(drop=True)


def assert_same_scores(expected: str, actual: str, tol: float = 1e-6) -> None:
    """Both outputs hold the same (image_id, seed) rows with scores equal within ``tol``."""
    a, b = read_scores(expected), read_scores(actual)
    assert len(a) > 0
    assert not b.duplicated(KEY).any()
    merged = a.merge(b, on=KEY, how="outer", suffixes=("_a", "_b"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged.loc[merged["_merge"] != "both", KEY]
    for col in ("final_score", "fine_score", "holistic_score", "image_residual_score",
                "text_prior_score"):
        x = merged[f"{col}_a"].to_numpy(dtype=float)
        y = merged[f"{col}_b"].to_numpy(dtype=float)
        np.testing.assert_allclose(y, x, rtol=0, atol=tol, equal_nan=True, err_msg=col)
    for col in ("dataset", "category", "k_used", "model_id"):
        assert (merged[f"{col}_a"].astype(str) == merged[f"{col}_b"].astype(str)).all(), col
    refs_a, refs_b = merged["reference_ids_a"], merged["reference_ids_b"]
    assert [list(r) for r in refs_a] == [list(r) for r in refs_b]
