"""Dataset names round-trip exactly: datasets that a lossy folder encoding would merge into
one folder are scored together, each reads back with its own value through pyarrow, pandas and DuckDB,
a name too long for a folder becomes error rows, and rescoring one of them leaves the others
untouched."""
from __future__ import annotations

import os
from dataclasses import replace

import duckdb
import pandas as pd
import pytest

from pipeline.core.layout import NULL_PARTITION, current_record, partition_value, read_partition
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.run import run_score
from tests.storage.helpers import (config, plain_pyarrow, recorded_duckdb, recorded_pandas,
                                   recorded_pyarrow, rows, tiny_manifest)

DATE = "2024-05-06"
HOSTILE = ["a/b", "a_b", "a=b", "a:b", "ä b", "%41", ".hidden"]
TOO_LONG = "long-" + "x" * 260
COLS = ["dataset", "image_id", "run_id"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    out = str(root / "out")
    everything = tiny_manifest(str(root / "all"), HOSTILE + [TOO_LONG])
    # the dataset name too long for a folder fails on purpose: let the run commit anyway
    run_score(replace(config(everything, out, DATE, "together"), max_failed_fraction=1.0))
    together = {t: rows(read_partition(out, DATE, t), COLS) for t in (SCORES, ERRORS)}
    write_errors = [r for r in read_partition(out, DATE, ERRORS).to_pylist()
                    if r["stage"] == "write"]
    error_folders = os.listdir(f"{out}/{ERRORS}")
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(out) for n in names
                   if "/scores/" in d)
    alone = tiny_manifest(str(root / "alone"), ["a_b"])
    run_score(config(alone, out, DATE, "alone"))
    return {"out": out, "together": together, "files_before": files,
            "write_errors": write_errors, "error_folders": error_folders}


def test_every_dataset_reads_back_with_its_exact_value(runs):
    out = runs["out"]
    want = sorted(HOSTILE)
    assert sorted({r[0] for r in runs["together"][SCORES]}) == want
    assert len(runs["together"][SCORES]) == len(HOSTILE)  # one query each, none merged
    # One folder per value, named as pyarrow's own hive writer names it.
    assert sorted(os.listdir(f"{out}/{SCORES}")) == sorted(
        f"dataset={partition_value(d)}" for d in HOSTILE)
    # pyarrow, pandas and DuckDB, plainly over the folders ...
    assert sorted(plain_pyarrow(out, SCORES)["dataset"].to_pylist()) == want
    assert sorted(pd.read_parquet(f"{out}/{SCORES}")["dataset"].astype(str)) == want
    plain_duck = duckdb.sql(
        f"SELECT dataset FROM read_parquet('{out}/{SCORES}/*/*/*.parquet', "
        "hive_partitioning=true)").fetchall()
    assert sorted(d for (d,) in plain_duck) == want
    # ... and through the records.
    assert sorted(recorded_pyarrow(out, SCORES)["dataset"].to_pylist()) == want
    assert sorted(recorded_pandas(out, SCORES)["dataset"].astype(str)) == want
    assert [d for (d,) in recorded_duckdb(out, SCORES, "dataset")] == sorted(want, key=str)


def test_a_name_that_cannot_be_a_folder_is_an_error_row(runs):
    (error,) = runs["write_errors"]
    assert error["dataset"] is None and error["image_id"] == "q7-1" and error["seed"] == 0
    assert TOO_LONG in error["reason"] and "over the 255-byte limit" in error["reason"]
    assert not any(TOO_LONG[:20] in name for name in os.listdir(f"{runs['out']}/{SCORES}"))
    assert runs["error_folders"].count(f"dataset={NULL_PARTITION}") == 1
    # Rows without a dataset come from the manifest each run reads whole: the rerun, whose
    # manifest has no such row, replaced them by none (they used to stay for good).
    assert None not in {p.dataset for p in current_record(runs["out"], DATE).partitions(ERRORS)}
    assert f"dataset={NULL_PARTITION}" not in os.listdir(f"{runs['out']}/{ERRORS}")


def test_rescoring_one_dataset_leaves_the_others_untouched(runs):
    out, together = runs["out"], runs["together"]
    now = rows(read_partition(out, DATE), COLS)
    assert [r for r in now if r[0] != "a_b"] == [r for r in together[SCORES] if r[0] != "a_b"]
    assert [r[2] for r in now if r[0] == "a_b"] == ["alone"]
    assert rows(plain_pyarrow(out, SCORES), COLS) == now  # no file of the first a_b left
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(out) for n in names
                   if "/scores/" in d)
    untouched = [f for f in runs["files_before"] if "/dataset=a_b/" not in f]
    assert [f for f in files if "/dataset=a_b/" not in f] == untouched
    record = current_record(out, DATE)
    assert {p.dataset: p.run_id for p in record.partitions(SCORES)} == {
        **{d: "together" for d in HOSTILE}, "a_b": "alone"}
