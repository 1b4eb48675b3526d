"""Staging part files and committing them: the Beam side of :mod:`pipeline.core.commit`.

Workers write part files into the run's staging folder (:class:`StageFiles`), named with
the run's key; the anomaly-map step writes its files in place and reports the bundle
attempts that succeeded (``ATTEMPT`` elements). One commit step, after every bundle of every
table succeeded, moves exactly the reported files to their final, unique names, names the
successful attempts' map folders and writes the date's commit record
(:class:`CommitStaged`). A rerun replaces the datasets it covers, never duplicates rows, and
a failed run leaves the previous result in force. :class:`WritePartitioned` is both for one
table.
"""
from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from typing import Iterable, Mapping

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.core.commit import CommitPlan, Staged, commit_run, stage_empty, write_staged
from pipeline.core.failures import DEFAULT_MAX_FAILED_FRACTION, FailureTally, write_refusal
from pipeline.core.layout import SUCCESS_MARKER, output_fs, partition_dir, unstorable_reason
from pipeline.core.schemas import METRICS_NAMESPACE, to_table

LOG = logging.getLogger(__name__)

#: Kinds of the elements StageFiles, the report steps and the in-place writers emit:
#: (kind, table, dataset, path) — for ATTEMPT the path is the successful bundle attempt's id.
PART, REPORT, ATTEMPT = "part", "report", "attempt"

__all__ = ["ATTEMPT", "CommitStaged", "PART", "REPORT", "SUCCESS_MARKER", "StageFiles",
           "WritePartitioned"]


class _StageFilesFn(beam.DoFn):
    """Buffers records per dataset and writes part files to staging: yields
    ``(PART, table, dataset, path relative to the output root)``."""

    def __init__(self, plan: CommitPlan, table: str, schema: pa.Schema,
                 rows_per_file: int) -> None:
        self._plan = plan
        self._table = table
        self._schema = schema
        self._rows_per_file = rows_per_file
        self._rows = Metrics.counter(METRICS_NAMESPACE, f"{table}_rows_written")

    def start_bundle(self) -> None:
        self._buffers: dict[str | None, list[dict]] = defaultdict(list)

    def _flush(self, dataset: str | None) -> tuple:
        records = self._buffers.pop(dataset)
        rel = (f"{self._plan.staging}/{self._table}/"
               f"part-{self._plan.commit_id}-{uuid.uuid4().hex}.parquet")
        fs, root = output_fs(self._plan.output)
        path = f"{root}/{rel}"
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(to_table(records, self._schema), f)
        self._rows.inc(len(records))
        return PART, self._table, dataset, rel

    def process(self, record: dict) -> Iterable:
        dataset = record.get("dataset")
        reason = unstorable_reason("dataset", dataset)
        if reason is not None:  # WriteOutputs turns these into error rows beforehand
            raise ValueError(f"{self._table} row {record.get('image_id')!r}: {reason}")
        buf = self._buffers[dataset]
        buf.append(record)
        if len(buf) >= self._rows_per_file:
            yield self._flush(dataset)

    def finish_bundle(self) -> Iterable:
        for dataset in list(self._buffers):
            yield WindowedValue(self._flush(dataset), 0, [GlobalWindow()])


class StageFiles(beam.PTransform):
    """Dict records with a ``dataset`` key → part files of ``table`` in the run's staging
    folder; returns ``(PART, table, dataset, path)`` per file."""

    def __init__(self, plan: CommitPlan, table: str, schema: pa.Schema,
                 rows_per_file: int = 50_000) -> None:
        super().__init__()
        self._fn = _StageFilesFn(plan, table, schema, rows_per_file)

    def expand(self, records):
        return records | "WriteFiles" >> beam.ParDo(self._fn)


class _CommitFn(beam.DoFn):
    def __init__(self, plan: CommitPlan, schemas: Mapping[str, pa.Schema], commit: bool,
                 max_failed_fraction: float) -> None:
        self._plan = plan
        self._schemas = dict(schemas)
        self._commit = commit
        self._max_failed = max_failed_fraction

    def process(self, files: list, datasets: list, tally: FailureTally | None = None
                ) -> Iterable:
        if tally is not None and tally.refused(self._max_failed):
            # A systematic failure: the record in force stays; the launcher reads the marker,
            # exits with its own status, and the run's lease collects what it wrote.
            LOG.error("%d of %d (query, seed, scorer) rows failed (%.1f%%, above %g): run %s "
                      "does not commit %s. Most common reason: %s", tally.failed,
                      tally.expected, 100 * tally.fraction, self._max_failed, self._plan.run_id,
                      self._plan.run_date, tally.most_common_reason)
            write_refusal(self._plan.output, self._plan.staging, tally, self._max_failed)
            return
        staged = Staged(
            parts=tuple((t, d, p) for kind, t, d, p in files if kind == PART),
            reports=tuple((t, p) for kind, t, _, p in files if kind == REPORT),
            datasets=tuple(dict.fromkeys(datasets)),
            attempts=tuple(dict.fromkeys((t, d, a) for kind, t, d, a in files
                                         if kind == ATTEMPT)))
        staged = stage_empty(self._plan, staged, self._schemas)
        if not self._commit:
            write_staged(self._plan, staged)
            return
        record = commit_run(self._plan, staged)
        owned = staged.owned()
        for table in sorted({t for t, _, _ in staged.parts + staged.attempts}):
            for p in record.partitions(table):
                if p.dataset in owned and p.prefix is None:
                    yield partition_dir(self._plan.output, table, p.dataset, self._plan.run_date)


class CommitStaged(beam.PTransform):
    """Every staged file of a run (one PCollection of ``(kind, table, dataset, path)``) →
    one commit of the date, after all of them are written. Returns the committed partition
    folders.

    ``datasets`` (a PCollection of names) are the datasets the run answers for even without
    a row; each partitioned table of ``schemas`` gets an empty file for them. With
    ``commit=False`` the files are only listed in the staging folder
    (:func:`pipeline.core.commit.read_staged`), for a caller that adds files and commits.
    ``tally`` (a one-element PCollection of :class:`FailureTally`): when its failed fraction
    is above ``max_failed_fraction`` nothing is committed or listed, and a refusal marker
    is left in the staging folder (:func:`pipeline.core.failures.read_refusal`).
    """

    def __init__(self, plan: CommitPlan, schemas: Mapping[str, pa.Schema], datasets=None,
                 commit: bool = True, tally=None,
                 max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION) -> None:
        super().__init__()
        self._fn = _CommitFn(plan, schemas, commit, max_failed_fraction)
        self._datasets = datasets
        self._tally = tally

    def expand(self, files):
        datasets = self._datasets
        if datasets is None:
            datasets = files.pipeline | "NoDatasets" >> beam.Create([])
        side = {"datasets": beam.pvalue.AsList(datasets)}
        if self._tally is not None:
            side["tally"] = beam.pvalue.AsSingleton(self._tally)
        return (files
                | "AllFiles" >> beam.combiners.ToList()
                | "Commit" >> beam.ParDo(self._fn, **side))


class WritePartitioned(beam.PTransform):
    """Dict records with a ``dataset`` key → ``<output>/<table>/dataset=/run_date=`` Parquet,
    committed as one record change of ``run_date``.

    Returns the committed partition folders. ``datasets`` (a PCollection of names) are the
    partitions this run owns even if it writes no row for them.
    """

    def __init__(self, output: str, table: str, schema: pa.Schema, run_date: str, run_id: str,
                 datasets=None, rows_per_file: int = 50_000,
                 plan: CommitPlan | None = None) -> None:
        super().__init__()
        plan = plan or CommitPlan(output, run_date, run_id)
        self._stage = StageFiles(plan, table, schema, rows_per_file)
        self._commit = CommitStaged(plan, {table: schema}, datasets)

    def expand(self, records):
        return records | "Stage" >> self._stage | self._commit

