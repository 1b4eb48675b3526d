"""WritePartitioned: hive partitions committed with one record; reruns replace, never
duplicate; what plain hive readers see is the result in force."""
from __future__ import annotations

import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core.layout import current_record, partition_dir, read_partition
from tests.beamtest import counter
from transforms.write import SUCCESS_MARKER, WritePartitioned

SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("value", pa.int64())])
TABLE = "t"


def _write(test_pipeline, output: str, records: list[dict], run_date: str, run_id: str,
           datasets: list[str] | None = None, rows_per_file: int = 50_000):
    p = test_pipeline()
    owned = None if datasets is None else p | "Datasets" >> beam.Create(datasets)
    committed = (p | "Records" >> beam.Create(records)
                 | WritePartitioned(output, TABLE, SCHEMA, run_date, run_id, datasets=owned,
                                    rows_per_file=rows_per_file))
    expected = sorted({partition_dir(output, TABLE, d, run_date)
                       for d in [r["dataset"] for r in records] + list(datasets or [])})
    assert_that(committed, equal_to(expected))
    result = p.run()
    result.wait_until_finish()
    return result


def _rows(output: str) -> list[tuple]:
    table = pads.dataset(f"{output}/{TABLE}", format="parquet", partitioning="hive").to_table()
    return sorted(zip(*(table[c].to_pylist() for c in ("dataset", "run_date", "image_id",
                                                       "value"))))


def _records(dataset: str, n: int, value: int) -> list[dict]:
    return [{"dataset": dataset, "image_id": f"{dataset}-{i}", "value": value} for i in range(n)]


def test_partitions_are_hive_folders_with_success_marker(tmp_path, test_pipeline):
    out = str(tmp_path)
    result = _write(test_pipeline, out, _records("a", 3, 1) + _records("b/x", 2, 1),
                    "2024-01-01", "r1", rows_per_file=2)
    assert counter(result, f"{TABLE}_rows_written") == 5
    for folder, n_files in (("a", 2), ("b%2Fx", 1)):  # "/" percent-encoded, as pyarrow does
        folder = tmp_path / TABLE / f"dataset={folder}" / "run_date=2024-01-01"
        names = sorted(os.listdir(folder))
        assert names.count(SUCCESS_MARKER) == 1
        assert len([n for n in names if n.endswith(".parquet")]) == n_files
    expected = sorted([("a", "2024-01-01", f"a-{i}", 1) for i in range(3)]
                      + [("b/x", "2024-01-01", f"b/x-{i}", 1) for i in range(2)])
    assert _rows(out) == expected  # the exact dataset value comes back
    assert sorted(read_partition(out, "2024-01-01", TABLE)["dataset"].to_pylist()) == sorted(
        r[0] for r in expected)
    # Nothing hidden or staged is left beside the partitions.
    assert sorted(os.listdir(tmp_path / TABLE / "dataset=a")) == ["run_date=2024-01-01"]
    assert not (tmp_path / "_staging").exists()


def test_rerun_replaces_its_partitions_and_leaves_the_rest(tmp_path, test_pipeline):
    out = str(tmp_path)
    _write(test_pipeline, out, _records("a", 3, 1) + _records("b", 2, 1), "2024-01-01", "r1")
    _write(test_pipeline, out, _records("a", 2, 2), "2024-01-02", "r2")
    # Rerun of 2024-01-01 for dataset a only (other run id, fewer rows, new values).
    _write(test_pipeline, out, _records("a", 2, 3), "2024-01-01", "r3")

    assert _rows(out) == sorted(
        [("a", "2024-01-01", f"a-{i}", 3) for i in range(2)]      # replaced, not appended
        + [("b", "2024-01-01", f"b-{i}", 1) for i in range(2)]    # other dataset untouched
        + [("a", "2024-01-02", f"a-{i}", 2) for i in range(2)])   # other date untouched
    marker = tmp_path / TABLE / "dataset=a" / "run_date=2024-01-01" / SUCCESS_MARKER
    assert marker.read_text().strip() == "r3"
    # The record says which run each partition comes from; superseded files are gone.
    record = current_record(out, "2024-01-01")
    assert record.version == 2
    assert {p.dataset: p.run_id for p in record.partitions(TABLE)} == {"a": "r3", "b": "r1"}
    folder = tmp_path / TABLE / "dataset=a" / "run_date=2024-01-01"
    assert sorted(n for n in os.listdir(folder) if n.endswith(".parquet")) == sorted(
        f.rpartition("/")[2] for p in record.partitions(TABLE) if p.dataset == "a"
        for f in p.files)


def test_owned_dataset_without_rows_is_emptied(tmp_path, test_pipeline):
    out = str(tmp_path)
    _write(test_pipeline, out, _records("a", 2, 1) + _records("b", 2, 1), "2024-01-01", "r1")
    _write(test_pipeline, out, _records("a", 1, 2), "2024-01-01", "r2", datasets=["a", "b"])
    assert _rows(out) == [("a", "2024-01-01", "a-0", 2)]
    emptied = tmp_path / TABLE / "dataset=b" / "run_date=2024-01-01"
    assert (emptied / SUCCESS_MARKER).exists()
    # Still one readable file with the table's columns, so readers see the schema.
    (part,) = [n for n in os.listdir(emptied) if n.endswith(".parquet")]
    assert pq.read_table(emptied / part).schema.remove_metadata() == SCHEMA


def test_run_without_rows_still_has_the_schema(tmp_path, test_pipeline):
    out = str(tmp_path)
    _write(test_pipeline, out, [], "2024-01-01", "r1", datasets=["a"])
    table = pads.dataset(f"{out}/{TABLE}", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 0
    assert table.schema.names == SCHEMA.names + ["dataset", "run_date"]
