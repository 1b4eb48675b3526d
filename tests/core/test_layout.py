"""The output layout: paths, and reading committed partitions back with hive partitioning."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.layout import (INCOMING, RETIRED, SUCCESS_MARKER, aside_dir, aside_glob,
                                  committed_dates, is_retired, partition_dir, partition_glob,
                                  previous_date, read_partition, staging_root)
from pipeline.core.schemas import ERRORS, SCORES

D1, D2, D3 = "2024-01-01", "2024-01-02", "2024-01-03"


def put(folder: str, scores: list[float], *, commit: bool = True, name: str = "part-0",
        **columns) -> None:
    """A part file of ``final_score`` (+ ``columns``) in ``folder``, marked committed or not."""
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"final_score": scores, **columns}), f"{folder}/{name}.parquet")
    if commit:
        with open(f"{folder}/{SUCCESS_MARKER}", "w") as f:
            f.write("run\n")


def frame(table: pa.Table | None) -> list[tuple]:
    assert table is not None
    return sorted(zip(table["dataset"].to_pylist(), table["final_score"].to_pylist()))


def test_only_committed_partitions_are_read(tmp_path):
    out = str(tmp_path)
    put(partition_dir(out, SCORES, "a", D2), [0.1, 0.2])
    put(partition_dir(out, SCORES, "b", D2), [0.3])
    put(partition_dir(out, SCORES, "uncommitted", D2), [9.0], commit=False)
    put(partition_dir(out, SCORES, "a", D1), [8.0])  # another date
    # A commit in progress and one that died: new and retired copies beside the partitions.
    put(aside_dir(partition_dir(out, SCORES, "a", D2), INCOMING, "r2"), [7.0])
    put(aside_dir(partition_dir(out, SCORES, "c", D2), RETIRED, "r1"), [6.0])
    put(f"{staging_root(out, 'r2')}/{SCORES}/dataset=a", [5.0])
    put(partition_dir(out, ERRORS, "a", D2), [4.0])  # another table
    with open(f"{partition_dir(out, SCORES, 'a', D2)}/_common_metadata", "w") as f:
        f.write("not parquet")  # '_' files are not data

    table = read_partition(out, D2)
    assert frame(table) == [("a", 0.1), ("a", 0.2), ("b", 0.3)]
    assert "run_date" not in table.column_names
    assert frame(read_partition(out, D2, ERRORS)) == [("a", 4.0)]
    assert frame(read_partition(out, D1)) == [("a", 8.0)]
    assert read_partition(out, D3) is None
    assert read_partition(str(tmp_path / "nothing"), D2) is None


def test_folder_values_come_back_as_written_strings(tmp_path):
    out = str(tmp_path)
    for name in ("123", "2024-05-01", "a%41b", "007"):
        put(partition_dir(out, SCORES, name, D2), [0.5])
    table = read_partition(out, D2, columns=["final_score"])
    assert table.schema.field("dataset").type == pa.string()
    assert sorted(table["dataset"].to_pylist()) == ["007", "123", "2024-05-01", "a%41b"]
    assert table.column_names == ["final_score", "dataset"]


def test_files_of_different_runs_are_read_with_one_schema(tmp_path):
    out = str(tmp_path)
    put(partition_dir(out, SCORES, "a", D2), [0.1], image_id=["x"])
    put(partition_dir(out, SCORES, "b", D2), [0.2], image_id=["y"], patch_map=[[1.0, 2.0]])
    put(partition_dir(out, SCORES, "b", D2), [], name="part-empty",
        image_id=pa.array([], pa.string()), patch_map=pa.array([], pa.list_(pa.float64())))
    table = read_partition(out, D2)
    rows = sorted(table.to_pylist(), key=lambda r: r["dataset"])
    assert rows == [{"final_score": 0.1, "image_id": "x", "patch_map": None, "dataset": "a"},
                    {"final_score": 0.2, "image_id": "y", "patch_map": [1.0, 2.0],
                     "dataset": "b"}]
    assert read_partition(out, D2, columns=["image_id", "dataset"]).column_names == [
        "image_id", "dataset"]


def test_an_empty_committed_partition_reads_as_no_rows(tmp_path):
    out = str(tmp_path)
    put(partition_dir(out, SCORES, "a", D2), [], name="part-empty")
    table = read_partition(out, D2)
    assert table is not None and table.num_rows == 0
    assert table.column_names == ["final_score", "dataset"]


def test_committed_and_previous_dates(tmp_path):
    out = str(tmp_path)
    for ds, date in (("a", D1), ("b", D3), ("a", "2024-01-05"), ("123", D3)):
        put(partition_dir(out, SCORES, ds, date), [0.1])
    put(partition_dir(out, SCORES, "a", "2024-01-04"), [0.1], commit=False)
    put(aside_dir(partition_dir(out, SCORES, "a", D2), INCOMING, "x"), [0.1])
    put(partition_dir(out, ERRORS, "a", "2024-01-06"), [0.1])
    assert committed_dates(out) == [D1, D3, "2024-01-05"]
    assert committed_dates(out, ERRORS) == ["2024-01-06"]
    assert previous_date(out, "2024-01-05") == D3
    assert previous_date(out, "2024-01-04") == D3  # uncommitted: not a night
    assert previous_date(out, D3) == D1  # hidden D2 commit: not a night
    assert previous_date(out, D1) is None
    assert committed_dates(str(tmp_path / "nothing")) == []


def test_commit_folders_sit_beside_their_partition():
    final = partition_dir("gs://b/out", SCORES, "a/b", D2)
    assert final == "gs://b/out/scores/dataset=a_b/run_date=2024-01-02"
    incoming, retired = aside_dir(final, INCOMING, "r1"), aside_dir(final, RETIRED, "r1")
    assert incoming == "gs://b/out/scores/dataset=a_b/.run_date=2024-01-02.incoming-r1"
    assert is_retired(retired) and not is_retired(incoming) and not is_retired(final)
    assert aside_glob(partition_glob("gs://b/out", SCORES, D2)) == (
        "gs://b/out/scores/dataset=*/.run_date=2024-01-02.*")


def test_reads_what_a_commit_committed(tmp_path):
    """The writer's commit and these readers agree on the layout."""
    write = pytest.importorskip("transforms.write")
    out = str(tmp_path)
    staged = f"{staging_root(out, 'r1')}/{SCORES}/dataset=123/part-1.parquet"
    put(os.path.dirname(staged), [0.4], commit=False, name="part-1")
    write.commit_partitions(out, SCORES, D2, "r1", [("123", staged)], ["123", "empty"],
                            schema=pa.schema([("final_score", pa.float64())]))
    assert frame(read_partition(out, D2)) == [("123", 0.4)]
    assert committed_dates(out) == [D2]
