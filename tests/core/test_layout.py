"""The output layout: paths, encoded partition values, and reading the tables in force back
through the dates' commit records."""
from __future__ import annotations

import json
import os

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pipeline.core.commit import CommitPlan, Staged, commit_run
from pipeline.core.layout import (NULL_PARTITION, commits_dir, committed_dates, current_files,
                                  current_record, decode_value, partition_dir, partition_value,
                                  previous_date, read_partition, record_in_force, staging_path,
                                  staging_root, summary_dir, unstorable_reason)
from pipeline.core.schemas import ERRORS, SCORES

D1, D2, D3 = "2024-01-01", "2024-01-02", "2024-01-03"


def stage(out: str, date: str, run: str, parts: dict, table: str = SCORES) -> Staged:
    """Part files of ``final_score`` per dataset in run ``run``'s staging folder."""
    staged = []
    for n, (dataset, scores) in enumerate(parts.items()):
        rel = f"{staging_path(date, run)}/{table}/part-{run}-{table}-{n}.parquet"
        os.makedirs(os.path.dirname(f"{out}/{rel}"), exist_ok=True)
        pq.write_table(pa.table({"final_score": pa.array(scores, pa.float64())}), f"{out}/{rel}")
        staged.append((table, dataset, rel))
    return Staged(parts=tuple(staged))


def commit(out: str, date: str, run: str, parts: dict, table: str = SCORES,
           errors: dict | None = None):
    """One run's commit of ``parts`` of ``table`` (and ``errors``: the same run's errors)."""
    plan = CommitPlan(out, date, run)
    staged = stage(out, date, plan.commit_id, parts, table)
    if errors:
        staged = staged + stage(out, date, plan.commit_id, errors, ERRORS)
    return commit_run(plan, staged)


def frame(table: pa.Table | None) -> list[tuple]:
    assert table is not None
    return sorted(zip(table["dataset"].to_pylist(), table["final_score"].to_pylist()))


def put_stray(folder: str, scores: list[float]) -> None:
    """A part file that no record names (a dead run's, or staging)."""
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table({"final_score": scores}), f"{folder}/part-0.parquet")


def test_partition_values_are_percent_encoded_like_pyarrow(tmp_path):
    values = ["a/b", "a_b", "a=b", "a:b", "ä b", "%41", ".hidden", "a+b", "", "x\ny", "123"]
    for v in values:
        assert decode_value(partition_value(v)) == v
    assert len({partition_value(v) for v in values}) == len(values)
    assert partition_value(None) == NULL_PARTITION and decode_value(NULL_PARTITION) is None
    # pyarrow's own hive writer makes the same folder names.
    pads.write_dataset(pa.table({"v": values, "dataset": values}), str(tmp_path),
                       format="parquet", partitioning=["dataset"], partitioning_flavor="hive")
    assert sorted(os.listdir(tmp_path)) == sorted(f"dataset={partition_value(v)}"
                                                 for v in values)


def test_names_too_long_for_a_folder_are_refused():
    fits = "x" * (255 - len("dataset="))
    assert unstorable_reason("dataset", fits) is None
    assert "256 bytes" in unstorable_reason("dataset", fits + "x")
    # Percent-encoding counts: 'ä' takes 6 bytes in the folder name.
    assert "over the 255-byte limit" in unstorable_reason("dataset", "ä" * 42)
    assert "reserved" in unstorable_reason("dataset", NULL_PARTITION)
    assert unstorable_reason("dataset", None) is None


def test_paths():
    assert partition_dir("gs://b/out", SCORES, "a/b", D2) == (
        "gs://b/out/scores/dataset=a%2Fb/run_date=2024-01-02")
    assert summary_dir("s3://b/out/", D2) == "s3://b/out/summary/run_date=2024-01-02"
    assert staging_root("/o", D2, "r/1") == "/o/_staging/run_date=2024-01-02/r%2F1"
    assert commits_dir("/o", D2) == "/o/_commits/run_date=2024-01-02"


def test_only_what_the_record_names_is_read(tmp_path):
    out = str(tmp_path)
    commit(out, D2, "r1", {"a": [0.1, 0.2], "b/x": [0.3]}, errors={"a": [4.0]})
    commit(out, D1, "r0", {"a": [8.0]})
    # Files no record names: a dead commit's, staging, a stray '_' file.
    put_stray(partition_dir(out, SCORES, "c", D2), [9.0])
    put_stray(f"{staging_root(out, D2, 'r2')}/{SCORES}", [5.0])
    with open(f"{partition_dir(out, SCORES, 'a', D2)}/_common_metadata", "w") as f:
        f.write("not parquet")

    table = read_partition(out, D2)
    assert frame(table) == [("a", 0.1), ("a", 0.2), ("b/x", 0.3)]
    assert "run_date" not in table.column_names
    assert frame(read_partition(out, D2, ERRORS)) == [("a", 4.0)]
    assert frame(read_partition(out, D1)) == [("a", 8.0)]
    assert read_partition(out, D3) is None
    assert read_partition(str(tmp_path / "nothing"), D2) is None
    assert read_partition(out, D2, columns=["final_score"]).column_names == [
        "final_score", "dataset"]


def test_files_of_different_runs_are_read_with_one_schema(tmp_path):
    out = str(tmp_path)
    commit(out, D2, "r1", {"a": [0.1]})
    rel = f"{staging_path(D2, 'r2')}/{SCORES}/part-2.parquet"
    os.makedirs(os.path.dirname(f"{out}/{rel}"))
    pq.write_table(pa.table({"final_score": [0.2], "patch_map": [[1.0, 2.0]]}), f"{out}/{rel}")
    commit_run(CommitPlan(out, D2, "r2"), Staged(parts=((SCORES, "b", rel),)))
    rows = sorted(read_partition(out, D2).to_pylist(), key=lambda r: r["dataset"])
    assert rows == [{"final_score": 0.1, "patch_map": None, "dataset": "a"},
                    {"final_score": 0.2, "patch_map": [1.0, 2.0], "dataset": "b"}]


def test_committed_and_previous_dates(tmp_path):
    out = str(tmp_path)
    for ds, date in (("a", D1), ("b", D3), ("a", "2024-01-05"), ("123", D3)):
        commit(out, date, f"r-{ds}-{date}", {ds: [0.1]})
    put_stray(partition_dir(out, SCORES, "a", "2024-01-04"), [0.1])
    commit(out, "2024-01-06", "e", {"a": [0.1]}, table=ERRORS)
    assert committed_dates(out) == [D1, D3, "2024-01-05"]
    assert committed_dates(out, ERRORS) == ["2024-01-06"]
    assert previous_date(out, "2024-01-05") == D3
    assert previous_date(out, "2024-01-04") == D3  # no record: not a night
    assert previous_date(out, D3) == D1
    assert previous_date(out, D1) is None
    assert committed_dates(str(tmp_path / "nothing")) == []


def test_current_files_and_the_record_document(tmp_path):
    out = str(tmp_path)
    commit(out, D2, "r1", {"a/b": [0.1], "c": [0.2]})
    files = current_files(out, SCORES, D2)
    assert [f.split("/scores/")[1].rpartition("/")[0] for f in files] == [
        "dataset=a%2Fb/run_date=2024-01-02", "dataset=c/run_date=2024-01-02"]
    assert current_files(out, SCORES) == files
    (name,) = os.listdir(commits_dir(out, D2))
    with open(f"{commits_dir(out, D2)}/{name}") as f:
        doc = json.load(f)
    assert doc["format"] == "inctrl-commit/2" and doc["version"] == 1 and doc["run_id"] == "r1"
    part = doc["tables"]["scores"]["partitions"][0]
    assert part["dataset"] == "a/b" and part["files"][0].startswith("scores/dataset=a%2Fb/")


def test_the_record_in_force_skips_an_unreadable_newest_record(tmp_path):
    out = str(tmp_path)
    assert record_in_force(out, D2) == (0, None) and current_record(out, D2) is None
    commit(out, D2, "r1", {"a": [0.1]})
    commit(out, D2, "r2", {"a": [0.2]})
    # A record whole or absent is what exclusive creation gives; a torn one (a file system
    # without it) is skipped, and the newest version still counts, so the next commit
    # cannot be created on it.
    with open(f"{commits_dir(out, D2)}/0000000003.json", "w") as f:
        f.write('{"format": "inctrl-commit/2", "run_d')
    top, record = record_in_force(out, D2)
    assert top == 3 and record.version == 2 and record.run_id == "r2"
    assert current_record(out, D2) == record
    assert frame(read_partition(out, D2)) == [("a", 0.2)]


def test_any_fsspec_file_system():
    output = "memory://layout-test/out"
    fs = fsspec.filesystem("memory")
    rel = f"{staging_path(D2, 'm1')}/{SCORES}/part-1.parquet"
    with fs.open(f"/layout-test/out/{rel}", "wb") as f:
        pq.write_table(pa.table({"final_score": [0.25]}), f)
    commit_run(CommitPlan(output, D2, "m1"), Staged(parts=((SCORES, "a/b", rel),)))
    assert frame(read_partition(output, D2)) == [("a/b", 0.25)]
    assert current_files(output, SCORES, D2)[0].startswith(
        "memory://layout-test/out/scores/dataset=a%2Fb/")
