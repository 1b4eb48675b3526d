"""The nightly inspection run: score one capture date's queries, idempotently and incrementally.

``python -m pipeline nightly --manifest M --output OUT --date YYYY-MM-DD`` reads the manifest,
plans the night (which queries of that date still need a score), runs the scoring job for
those only and writes the date's ``run_date=`` partitions, then compares the night's score
distribution with the previous night's.

Rules, in the order they apply:

* **Queries** are the manifest's ``role=query`` rows whose ``capture_date`` (a date,
  timestamp or ISO string column, normalised to ``YYYY-MM-DD``) equals ``--date``.
* **References** are the ``role=reference`` rows captured on or before ``--date``, or
  without a ``capture_date``: tonight that is every current reference, and a backfill of an
  old date does not use references that arrived later.
* **Incremental**: a query whose rows for every requested seed are already in the date's
  partition with the same ``model_id``, ``k`` and ``false_alarm_rate`` is not scored
  again; its rows are carried into the new partition (with their anomaly maps, kept where
  they are and said so in the record, and with the decisions of the run that scored them). ``--force`` rescores every query of the date. Rows of other models, other ``k``,
  seeds not asked for or queries no longer in the manifest are dropped, and so is every
  table's partition of a dataset no longer in the manifest: a night that scores stands for
  the whole date.
* **Idempotent and whole**: the night holds the date's lock (a second run of the date
  waits ``lock_wait_s`` or refuses). The new partitions (carried + new rows), the summary,
  the drift report and ``nightly.json`` are written aside and put in force together by one
  commit record of the date (``pipeline.core.commit``); other dates are never touched and a
  failed or killed run leaves the previous result, every table of it, in force.
* **Reference features** are cached in ``OUT/_feature_cache`` (``--feature-cache``), keyed by
  image content hash and backbone identity: unchanged references are not extracted again.
* **Drift**: per dataset (line), the count and share of queries the calibrated decisions
  flagged anomalous (``is_anomalous``, at ``--false-alarm-rate``) and the score quantiles
  (p50, p90, p99) of tonight's committed rows of the run's first scorer, against the latest
  earlier date with scores; a line drifts when its anomaly rate (or a quantile) moved by
  more than ``--drift-tolerance``. Committed with the night and published beside the
  summary as ``drift.{parquet,json,md}``; ``--fail-on-drift`` turns an alert into exit
  code 3. The deprecated ``--alert-threshold`` adds the old count of raw scores at or above
  it.

The plan is :mod:`pipeline.nightly.plan`, the drift statistics :mod:`pipeline.nightly.drift`
and the partitions of earlier runs are read through :mod:`pipeline.core.layout`; this module
runs the night and writes ``nightly.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Sequence

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.runners.runner import PipelineResult

from pipeline.core.commit import (KEPT_CARRIED, KEPT_UP_TO_DATE, CommitPlan, Staged, commit_run,
                                  preview, read_staged, relative)
from pipeline.core.config import ScoreConfig
from pipeline.core.layout import (DRIFT as DRIFT_TABLE, MAPS, NIGHTLY, Record, current_record,
                                  previous_date, read_files, read_partition, summary_dir)
from pipeline.core.lease import date_lease
from pipeline.core.manifest import validate_manifest_schema
from pipeline.core.reports import jsonable
from pipeline.core.schemas import SCORES, SUMMARY
from pipeline.core.selection import RowSelection
from pipeline.nightly.drift import DRIFT, drift_markdown, drift_report, drift_status, write_drift
from pipeline.nightly.plan import DATE_COLUMN, LEGACY_SCORER, NightPlan, date_queries, plan_night
from pipeline.run import publish_report, run_score
from pipeline.runner import counter, runner_name

LOG = logging.getLogger(__name__)

DEFAULT_DRIFT_TOLERANCE = 0.1
EXIT_DRIFT = 3

__all__ = ["DATE_COLUMN", "DEFAULT_DRIFT_TOLERANCE", "EXIT_DRIFT", "NightlyOptions",
           "NightlyReport", "run_nightly"]


@dataclass(frozen=True)
class NightlyOptions:
    """What the nightly run adds to the scoring job's configuration.

    ``alert_threshold`` is deprecated: alerts count the calibrated decisions; a threshold
    only adds the count of raw scores at or above it to the drift report.
    """

    force: bool = False
    alert_threshold: float | None = None
    drift_tolerance: float = DEFAULT_DRIFT_TOLERANCE
    fail_on_drift: bool = False
    #: Seconds to wait for another run of the same date to finish (0: refuse at once).
    lock_wait_s: float = 0.0


@dataclass
class NightlyReport:
    """What one night did; written as ``nightly.json`` beside the summary."""

    date: str
    run_id: str
    model_ids: dict[str, str]
    manifest: str
    output: str
    runner: str
    forced: bool
    queries_on_date: int = 0
    already_scored: int = 0
    scored_queries: int = 0
    carried_rows: int = 0
    dropped_rows: int = 0
    skipped: bool = False
    pipeline_seconds: float = 0.0
    reference_cache_hits: int | None = None
    reference_cache_misses: int | None = None
    reference_features_extracted: int | None = None
    query_features_extracted: int | None = None
    previous_date: str | None = None
    drift: list[dict] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def run_nightly(config: ScoreConfig, beam_args: Sequence[str],
                options: NightlyOptions = NightlyOptions()) -> NightlyReport:
    """Score ``config.run_date``'s queries into its partitions, report drift, and commit it
    all with one record of the date, under the date's lock."""
    date = config.run_date
    schema = validate_manifest_schema(config.manifest)
    identity = config.suite.identity()  # a missing checkpoint fails here
    model_ids = identity.by_scorer()
    report = NightlyReport(date=date, run_id=config.run_id, model_ids=model_ids,
                           manifest=config.manifest, output=config.output,
                           runner=runner_name(beam_args), forced=options.force)
    with date_lease(config.output, date, config.run_id, wait_s=options.lock_wait_s) as lease:
        queries = date_queries(config.manifest, schema, date)
        record = current_record(config.output, date)
        existing = read_partition(config.output, date)
        plan = plan_night(list(queries), _keys(existing), model_ids=model_ids, k=config.k,
                          seeds=config.seeds, force=options.force,
                          false_alarm_rate=config.false_alarm_rate)
        gone = _datasets_in_force(record) - {d for d, _ in queries} - {None}
        report.queries_on_date, report.already_scored = plan.queries, len(plan.skip)
        report.scored_queries, report.carried_rows = plan.to_score, plan.carried_rows
        report.dropped_rows = plan.dropped_rows
        LOG.info("Night %s: %d queries captured, %d already scored with these models, %d to "
                 "score; %d rows carried, %d dropped", date, plan.queries, len(plan.skip),
                 plan.to_score, plan.carried_rows, plan.dropped_rows)

        # What a night that does not score keeps: the summary of the scores it leaves.
        staged = Staged(kept=((SUMMARY, None, None, KEPT_UP_TO_DATE),))
        if plan.queries == 0:
            LOG.warning("The manifest has no query with %s %s: nothing to score; existing "
                        "partitions of that date are left as they are", DATE_COLUMN, date)
            report.skipped = True
        elif plan.up_to_date and not gone:
            LOG.info("Partition %s is up to date (use --force to rescore)", date)
            report.skipped = True
        else:
            if gone:
                LOG.info("Night %s: dropping %d datasets no longer in the manifest: %s", date,
                         len(gone), ", ".join(sorted(gone)))
            started = time.monotonic()
            kept = _carried(existing, plan)
            carried = _stage_carried(lease, kept)
            result = run_score(config, beam_args, manifest_schema=schema, identity=identity,
                               selection=RowSelection(query_date=date, skip=plan.skip,
                                                      references_until=date,
                                                      carried_scores=carried),
                               plan=lease, commit=False, total_queries=plan.to_score)
            # The night stands for the whole date: every dataset in force is replaced, by
            # this run's rows or by none.
            staged = read_staged(lease) + Staged(datasets=tuple(sorted(gone)))
            if config.write_anomaly_maps:
                staged = staged + _kept_maps(lease, record, kept)
            report.pipeline_seconds = round(time.monotonic() - started, 3)
            _record_metrics(report, result, cached=bool(config.feature_cache))

        staged = staged + _report_drift(config, options, report, lease, staged)
        staged = staged + _stage_report(lease, report)
        commit_run(lease, staged)
    publish_report(config.output, date)
    return report


def _keys(existing: pa.Table | None) -> pd.DataFrame:
    """The plan's view of the date's existing rows."""
    columns = ["dataset", "image_id", "seed", "model_id", "k", "scorer", "false_alarm_rate"]
    if existing is None:
        return pd.DataFrame(columns=columns)
    return existing.select([c for c in columns if c in existing.column_names]).to_pandas()


def _carried(existing: pa.Table | None, plan: NightPlan) -> pa.Table | None:
    """The existing rows the plan keeps (their datasets are the manifest's: the plan matched
    them by (dataset, image_id))."""
    if existing is None or not plan.carried_rows:
        return None
    return existing.filter(pa.array(plan.carry))


def _stage_carried(lease: CommitPlan, carried: pa.Table | None) -> str | None:
    """Write the carried rows into the run's staging folder for the job to read back."""
    if carried is None or not carried.num_rows:
        return None
    path = lease.staging_url("carried", "carried.parquet")
    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(local.rpartition("/")[0], exist_ok=True)
    with fs.open(local, "wb") as f:
        pq.write_table(carried, f)
    return path


def _datasets_in_force(record: Record | None) -> set[str | None]:
    """The datasets with a partition of any partitioned table in ``record``."""
    if record is None:
        return set()
    return {p.dataset for t in record.partitioned for p in record.partitions(t)}


def _kept_maps(lease: CommitPlan, record: Record | None, carried: pa.Table | None) -> Staged:
    """The maps partitions of the record in force that hold the carried rows' maps: kept on
    purpose (and said so in the record), so that the kept rows keep their URIs while the
    night's own maps replace the rest. Rows whose maps no partition in force holds keep
    dangling URIs, with a warning."""
    if (record is None or carried is None or not carried.num_rows
            or "anomaly_map_uri" not in carried.column_names):
        return Staged()
    by_prefix = {p.prefix: p for p in record.partitions(MAPS) if p.prefix is not None}
    by_file = {f: p for p in record.partitions(MAPS) if p.prefix is None for f in p.files}
    kept: dict[tuple, tuple] = {}
    missing = 0
    for row in carried.select(["dataset", "anomaly_map_uri", "overlay_uri"]).to_pylist():
        for uri in (row["anomaly_map_uri"], row["overlay_uri"]):
            if not uri:
                continue
            try:
                rel = relative(lease.output, uri)
            except ValueError:
                missing += 1
                continue
            # A folder partition's files lie in <prefix>/<attempt>/<file>.
            part = by_file.get(rel) or by_prefix.get(posixpath.dirname(posixpath.dirname(rel)))
            if part is None or part.dataset != row["dataset"]:
                missing += 1
                continue
            ref = part.prefix or rel
            kept.setdefault((part.dataset, part.prefix, part.files),
                            (MAPS, part.dataset, ref, KEPT_CARRIED))
    if missing:
        LOG.warning("%d map files of carried rows are in no partition in force; their rows "
                    "keep dangling URIs (rescore with --force)", missing)
    return Staged(kept=tuple(kept.values()))


def _stage_report(lease: CommitPlan, report: NightlyReport) -> Staged:
    """``nightly.json`` into the run's staging folder, to be committed with the night."""
    report.files["report"] = f"{summary_dir(lease.output, lease.run_date)}/nightly.json"
    path = lease.staging_url("reports", "nightly.json")
    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(local.rpartition("/")[0], exist_ok=True)
    with fs.open(local, "w") as f:
        json.dump(jsonable(dataclasses.asdict(report)), f, indent=2, allow_nan=False, default=str)
    return Staged(reports=((NIGHTLY, relative(lease.output, path)),))


def _record_metrics(report: NightlyReport, result: PipelineResult, *, cached: bool) -> None:
    if cached:
        report.reference_cache_hits = counter(result, "feature_cache_hits")
        report.reference_cache_misses = counter(result, "feature_cache_misses")
    report.reference_features_extracted = counter(
        result, "num_inferences", "ExtractReferenceFeatures")
    report.query_features_extracted = counter(result, "num_inferences", "ExtractQueryFeatures")
    LOG.info("Night %s scored in %.1f s; reference features: %s extracted, %s from the cache",
             report.date, report.pipeline_seconds, report.reference_features_extracted,
             report.reference_cache_hits)


#: The columns drift reads of the scores (``dataset`` comes from the partitions).
DRIFT_COLUMNS = ["final_score", "scorer", "is_anomalous"]


def _primary(table: pa.Table | None, scorer: str) -> pd.DataFrame | None:
    """The ``final_score``, ``is_anomalous`` and ``dataset`` of one scorer's rows (rows
    written before the scorer column existed are InCTRL's; before decisions, undecided):
    drift is followed for the run's first scorer."""
    if table is None:
        return None
    frame = table.to_pandas()
    if "is_anomalous" not in frame.columns:
        frame["is_anomalous"] = None
    written = frame["scorer"].fillna(LEGACY_SCORER)
    return frame.loc[written == scorer, ["final_score", "is_anomalous", "dataset"]].reset_index(
        drop=True)


def _scores_frame(output: str, date: str | None, scorer: str) -> pd.DataFrame | None:
    """A date's committed drift columns of ``scorer``, or None."""
    if date is None:
        return None
    return _primary(read_partition(output, date, columns=DRIFT_COLUMNS), scorer)


def _report_drift(config: ScoreConfig, options: NightlyOptions, report: NightlyReport,
                  lease: CommitPlan, staged: Staged) -> Staged:
    """The drift of the scores this night commits (``staged`` over the record in force)
    against the previous night's, staged for the night's commit."""
    date = config.run_date
    tonight = [(d, f) for d, f in preview(lease, staged, SCORES) if f.endswith(".parquet")]
    scorer = config.scorers[0]
    table = _primary(read_files(config.output, tonight, columns=DRIFT_COLUMNS), scorer)
    if table is None:
        LOG.warning("No scores for %s: no drift report", date)
        return Staged()
    before = previous_date(config.output, date)
    report.previous_date = before
    drift = drift_status(drift_report(table, _scores_frame(config.output, before, scorer),
                                      threshold=options.alert_threshold),
                         options.drift_tolerance)
    report.drift = json.loads(drift.to_json(orient="records"))
    report.alerts = drift.loc[drift["status"] == DRIFT, "dataset"].tolist()
    written = write_drift(
        drift, lease.staging_url("reports"), date=date, previous=before,
        extra={"run_date": date, "previous_date": before, "run_id": config.run_id,
               "model_id": report.model_ids[scorer], "scorer": scorer,
               "false_alarm_rate": config.false_alarm_rate,
               "threshold": options.alert_threshold,
               "tolerance": options.drift_tolerance})
    published = summary_dir(config.output, date)
    report.files.update({key: f"{published}/{path.rpartition('/')[2]}"
                         for key, path in written.items()})
    LOG.info("Drift %s vs %s:\n%s", date, before or "no previous night",
             drift_markdown(drift, date, before))
    for dataset in report.alerts:
        LOG.warning("Drift in dataset %r between %s and %s (anomaly rate or score quantiles "
                    "moved by more than %.3f)", dataset, before, date, options.drift_tolerance)
    return Staged(reports=tuple((DRIFT_TABLE, relative(config.output, path))
                                for path in written.values()))
