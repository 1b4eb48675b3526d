"""Reading what is in force when runs wrote different columns (dataset a rerun without maps,
dataset b with them): the README's pyarrow, pandas and DuckDB recipes and ``read_current``
give every column, and ``read_current`` survives a commit that lands during its read."""
from __future__ import annotations

import os

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import pipeline.core.layout as layout
from pipeline.core.commit import CommitPlan, Staged, commit_run
from pipeline.core.layout import PARTITIONING, current_files, read_current
from pipeline.core.schemas import SCORES

D1, D2 = "2024-07-01", "2024-07-02"


def commit(out: str, date: str, run: str, rows: dict[str, pa.Table]):
    """One run's scores parts, one file per dataset, committed."""
    plan = CommitPlan(out, date, run)
    parts = []
    for n, (dataset, table) in enumerate(rows.items()):
        rel = f"{plan.staging}/{SCORES}/part-{plan.commit_id}-{n}.parquet"
        os.makedirs(os.path.dirname(f"{out}/{rel}"), exist_ok=True)
        pq.write_table(table, f"{out}/{rel}")
        parts.append((SCORES, dataset, rel))
    return commit_run(plan, Staged(parts=tuple(parts)))


def plain(image_id: str) -> pa.Table:
    return pa.table({"image_id": [image_id], "final_score": [0.5]})


def with_map(image_id: str) -> pa.Table:
    return pa.table({"image_id": [image_id], "final_score": [0.9],
                     "anomaly_map_uri": [f"/maps/{image_id}.map.png"], "map_max": [1.0]})


@pytest.fixture()
def mixed(tmp_path) -> str:
    """Dataset a scored without maps (its file has no map columns, and sorts first), b with;
    on D2 the other way round."""
    out = str(tmp_path)
    commit(out, D1, "with-maps", {"a": with_map("a-1"), "b": with_map("b-1")})
    commit(out, D1, "rerun-a", {"a": plain("a-1")})  # a rerun without maps
    commit(out, D2, "r2", {"a": plain("a-2"), "b": with_map("b-2")})
    return out


WANT = {("a", "a-1", None, D1), ("b", "b-1", "/maps/b-1.map.png", D1),
        ("a", "a-2", None, D2), ("b", "b-2", "/maps/b-2.map.png", D2)}
COLUMNS = {"image_id", "final_score", "anomaly_map_uri", "map_max", "dataset", "run_date"}


def got(records) -> set[tuple]:
    return {(str(r["dataset"]), r["image_id"], r["anomaly_map_uri"], str(r["run_date"]))
            for r in records}


def test_every_recipe_gives_every_column_on_mixed_partitions(mixed):
    out = mixed
    files = current_files(out, SCORES)
    # The failure the recipes had (issue 21): the first file's columns only.
    first_only = pads.dataset(list(files), format="parquet", partitioning=PARTITIONING,
                              partition_base_dir=f"{out}/{SCORES}").to_table()
    assert "anomaly_map_uri" not in first_only.column_names
    # pyarrow, with the files' unified schema
    table = pads.dataset(files, schema=files.schema, format="parquet",
                         partitioning=PARTITIONING,
                         partition_base_dir=f"{out}/{SCORES}").to_table()
    assert set(table.column_names) == COLUMNS and got(table.to_pylist()) == WANT
    # pandas, the same schema
    frame = pd.read_parquet(files, schema=files.schema, partitioning=PARTITIONING)
    assert set(frame.columns) == COLUMNS
    assert got(frame.astype(object).where(frame.notna(), None).to_dict("records")) == WANT
    # DuckDB, columns unified by name
    rel = duckdb.sql(f"SELECT * FROM read_parquet({files!r}, hive_partitioning=true, "
                     "hive_types_autocast=false, union_by_name=true)")
    assert set(rel.columns) == COLUMNS
    assert got(dict(zip(rel.columns, r)) for r in rel.fetchall()) == WANT
    # read_current: one call
    current = read_current(out, SCORES)
    assert set(current.column_names) == COLUMNS and got(current.to_pylist()) == WANT
    assert got(read_current(out, SCORES, D2).to_pylist()) == {w for w in WANT if w[3] == D2}
    assert read_current(out, SCORES, "2020-01-01").num_rows == 0


def test_read_current_reads_again_when_a_commit_lands_during_its_read(mixed, monkeypatch):
    out = mixed
    stale = current_files(out, SCORES, D1)
    commit(out, D1, "meanwhile", {"a": with_map("a-9")})  # supersedes a's file
    with pytest.raises(FileNotFoundError):  # a reader holding a file list fails ...
        pq.read_table(stale[0])
    original, calls = layout.read_files, []

    def commit_during_read(output, files, columns=None):
        calls.append([f for _, f in files])
        if len(calls) == 1:  # the first read: another run commits the date meanwhile
            commit(out, D1, "racing", {"a": with_map("a-10"), "b": plain("b-10")})
        return original(output, files, columns)

    monkeypatch.setattr(layout, "read_files", commit_during_read)
    table = read_current(out, SCORES, D1)  # ... read_current reads the new record again
    assert len(calls) == 2 and calls[0] != calls[1]
    assert got(table.to_pylist()) == {("a", "a-10", "/maps/a-10.map.png", D1),
                                      ("b", "b-10", None, D1)}
