"""WritePartitioned: records → hive-partitioned Parquet, committed atomically per partition.

Workers write part files into a staging folder of the run. One commit step, after all
bundles succeeded, moves exactly the reported files into a hidden folder beside the
partition, marks it with ``_SUCCESS`` and swaps it in: a rerun replaces a partition whole,
never duplicates rows, and a failed run leaves the previous partition as it was.
"""
from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from typing import Iterable, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.core.layout import (INCOMING, RETIRED, SUCCESS_MARKER, aside_dir, aside_glob,
                                   is_retired, partition_dir, partition_glob, partition_name,
                                   partition_value, staging_root)
from pipeline.core.schemas import METRICS_NAMESPACE, to_table

LOG = logging.getLogger(__name__)


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, _, (root,) = fsspec.get_fs_token_paths(path)
    return fs, root


class _WriteFilesFn(beam.DoFn):
    """Buffers records per dataset and writes part files to staging: yields (dataset, path)."""

    def __init__(self, output: str, table: str, schema: pa.Schema, run_id: str,
                 rows_per_file: int) -> None:
        self._output = output
        self._table = table
        self._schema = schema
        self._run_id = run_id
        self._rows_per_file = rows_per_file
        self._rows = Metrics.counter(METRICS_NAMESPACE, f"{table}_rows_written")

    def start_bundle(self) -> None:
        self._buffers: dict[str, list[dict]] = defaultdict(list)

    def _flush(self, dataset: str) -> str:
        records = self._buffers.pop(dataset)
        folder = f"{staging_root(self._output, self._run_id)}/{self._table}/dataset={dataset}"
        path = f"{folder}/part-{uuid.uuid4().hex}.parquet"
        fs, local = _fs(path)
        fs.makedirs(local.rpartition("/")[0], exist_ok=True)
        with fs.open(local, "wb") as f:
            pq.write_table(to_table(records, self._schema), f)
        self._rows.inc(len(records))
        return path

    def process(self, record: dict) -> Iterable:
        dataset = partition_value(record.get("dataset"))
        buf = self._buffers[dataset]
        buf.append(record)
        if len(buf) >= self._rows_per_file:
            yield dataset, self._flush(dataset)

    def finish_bundle(self) -> Iterable:
        for dataset in list(self._buffers):
            yield WindowedValue((dataset, self._flush(dataset)), 0, [GlobalWindow()])


def commit_partitions(output: str, table: str, run_date: str, run_id: str,
                      files: Sequence[tuple[str, str]], datasets: Iterable[str],
                      schema: pa.Schema | None = None) -> list[str]:
    """Swap each dataset's staged files in as its ``run_date`` partition.

    ``datasets`` lists every dataset this run is responsible for: one without files gets an
    empty partition (its old rows for that date are replaced by none), holding one empty
    file of ``schema`` when given, so that readers still see the table's columns.
    """
    by_dataset: dict[str, list[str]] = defaultdict(list)
    for dataset, path in files:
        by_dataset[dataset].append(path)
    for dataset in datasets:
        by_dataset.setdefault(partition_value(dataset), [])
    committed = []
    for dataset, paths in sorted(by_dataset.items()):
        final = partition_dir(output, table, dataset, run_date)
        incoming = aside_dir(final, INCOMING, run_id)
        retired = aside_dir(final, RETIRED, run_id)
        fs, local_incoming = _fs(incoming)
        fs.makedirs(local_incoming, exist_ok=True)
        for path in sorted(paths):
            fs.mv(_fs(path)[1], f"{local_incoming}/{path.rpartition('/')[2]}")
        if not paths and schema is not None:
            with fs.open(f"{local_incoming}/part-empty.parquet", "wb") as f:
                pq.write_table(schema.empty_table(), f)
        with fs.open(f"{local_incoming}/{SUCCESS_MARKER}", "wb") as f:
            f.write(f"{run_id}\n".encode())
        local_final = _fs(final)[1]
        local_retired = _fs(retired)[1]
        had_old = fs.exists(local_final)
        if had_old:
            fs.mv(local_final, local_retired, recursive=True)
        fs.mv(local_incoming, local_final, recursive=True)
        if had_old:
            fs.rm(local_retired, recursive=True)
        committed.append(final)
        LOG.info("Committed %s (%d files)", final, len(paths))
    fs, staged = _fs(f"{staging_root(output, run_id)}/{table}")
    if fs.exists(staged):  # stray files of retried bundles
        fs.rm(staged, recursive=True)
    return committed


def recover_partitions(output: str, table: str, run_date: str) -> list[str]:
    """Tidy the ``run_date`` partitions of ``table`` after a run that died while committing.

    A commit retires the old partition, then renames the new one into place. If the process
    died between the two, the old partition is put back; hidden folders a dead commit left
    beside a partition are removed. Returns the partitions restored. Call it only while no
    other run writes the same date.
    """
    # A glob: url_to_fs leaves it unexpanded (get_fs_token_paths would expand it).
    fs, pattern = fsspec.core.url_to_fs(aside_glob(partition_glob(output, table, run_date)))
    by_dataset: dict[str, list[str]] = defaultdict(list)
    for path in sorted(fs.glob(pattern)):
        by_dataset[path.rstrip("/").rpartition("/")[0]].append(path)
    restored = []
    for dataset_dir, leftovers in sorted(by_dataset.items()):
        final = f"{dataset_dir}/{partition_name(run_date)}"
        retired = [p for p in leftovers if is_retired(p)]
        if retired and not fs.exists(final):
            fs.mv(retired[-1], final, recursive=True)
            restored.append(final)
            LOG.warning("Restored %s, retired by a commit that did not finish", final)
        for path in leftovers:
            if fs.exists(path):
                fs.rm(path, recursive=True)
    return restored


class _CommitFn(beam.DoFn):
    def __init__(self, output: str, table: str, run_date: str, run_id: str,
                 schema: pa.Schema | None = None) -> None:
        self._args = (output, table, run_date, run_id)
        self._schema = schema

    def process(self, files: list, datasets: list) -> Iterable:
        yield from commit_partitions(*self._args, files=files, datasets=datasets,
                                     schema=self._schema)


class WritePartitioned(beam.PTransform):
    """Dict records with a ``dataset`` key → ``<output>/<table>/dataset=/run_date=`` Parquet.

    Returns the committed partition folders. ``datasets`` (a PCollection of names) are the
    partitions this run owns even if it writes no row for them.
    """

    def __init__(self, output: str, table: str, schema: pa.Schema, run_date: str, run_id: str,
                 datasets=None, rows_per_file: int = 50_000) -> None:
        super().__init__()
        self._write = _WriteFilesFn(output, table, schema, run_id, rows_per_file)
        self._commit = _CommitFn(output, table, run_date, run_id, schema)
        self._datasets = datasets

    def expand(self, records):
        files = (
            records
            | "WriteFiles" >> beam.ParDo(self._write)
            | "AllFiles" >> beam.combiners.ToList()
        )
        if self._datasets is None:
            datasets = files.pipeline | "NoDatasets" >> beam.Create([])
        else:
            datasets = self._datasets
        return files | "Commit" >> beam.ParDo(self._commit, datasets=beam.pvalue.AsList(datasets))
