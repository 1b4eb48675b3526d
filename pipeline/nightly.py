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
  partition with the same ``model_id`` and ``k`` is not scored again; its rows are carried
  into the new partition. ``--force`` rescores every query of the date. Rows of other
  models, other ``k``, seeds not asked for or queries no longer in the manifest are dropped.
* **Idempotent**: the new partition (carried + new rows) is written aside and swapped in
  with a ``_SUCCESS`` marker (``transforms.write``); other dates are never touched and a
  failed run leaves the previous partition as it was.
* **Reference features** are cached in ``OUT/_feature_cache`` (``--feature-cache``), keyed by
  image content hash and backbone identity: unchanged references are not extracted again.
* **Drift**: per dataset, the score quantiles (p50, p90, p99) and the count of scores at or
  above ``--alert-threshold`` against the latest earlier date with scores, written beside the
  summary as ``drift.{parquet,json,md}``; ``--fail-on-drift`` turns an alert into exit code 3.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import apache_beam as beam
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.config import ScoreConfig, _date, add_score_flags, score_config_from_args
from pipeline.manifest import (ManifestRow, ManifestSchemaError, manifest_files, normalize_row,
                               validate_manifest_schema)
from pipeline.metrics import _jsonable, drift_report
from pipeline.model.loading import heads_hash, model_id
from pipeline.run import build_pipeline, make_runner
from pipeline.schemas import ERRORS, SCORES, SUMMARY
from transforms.write import recover_partitions, staging_root

LOG = logging.getLogger(__name__)

DATE_COLUMN = "capture_date"
FEATURE_CACHE_DIR = "_feature_cache"
DEFAULT_ALERT_THRESHOLD = 0.5
DEFAULT_DRIFT_TOLERANCE = 0.1
EXIT_DRIFT = 3

OK, NEW, GONE, DRIFT = "ok", "new", "gone", "drift"


# --------------------------------------------------------------------------------------------
# What tonight scores: picklable row filters and the pure plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NightQueries:
    """Query filter: captured on ``date`` and not already scored (``skip``)."""

    date: str
    skip: frozenset[str] = frozenset()

    def __call__(self, row: ManifestRow) -> bool:
        return row.capture_date == self.date and row.image_id not in self.skip


@dataclass(frozen=True)
class KnownReferences:
    """Reference filter: captured on or before ``date``, or undated."""

    date: str

    def __call__(self, row: ManifestRow) -> bool:
        return row.capture_date is None or row.capture_date <= self.date


@dataclass(frozen=True)
class NightPlan:
    """The night's work: which queries to score and which existing rows to keep."""

    queries: int  # queries captured on the date
    skip: frozenset[str]  # already scored: not scored again
    carry: np.ndarray  # bool per existing row: kept in the new partition
    existing_rows: int

    @property
    def to_score(self) -> int:
        return self.queries - len(self.skip)

    @property
    def carried_rows(self) -> int:
        return int(self.carry.sum())

    @property
    def dropped_rows(self) -> int:
        return self.existing_rows - self.carried_rows

    @property
    def up_to_date(self) -> bool:
        """Nothing to score and nothing to drop: the partition already is tonight's result."""
        return self.to_score == 0 and self.dropped_rows == 0


def plan_night(date_queries: Sequence[str], existing: pd.DataFrame, *, model: str, k: int,
               seeds: Sequence[int], force: bool = False) -> NightPlan:
    """Which of the date's queries (image ids) are done, and which existing rows carry over.

    ``existing`` holds the date's current rows with at least ``image_id``, ``seed``,
    ``model_id`` and ``k``. A query is done when it has a row for every seed in ``seeds``
    with this ``model`` and ``k``; only the done queries' rows for those seeds are kept (one
    per (image_id, seed)). ``force`` keeps nothing and rescores everything.
    """
    wanted = set(date_queries)
    n = len(existing)
    if force or n == 0:
        return NightPlan(len(wanted), frozenset(), np.zeros(n, dtype=bool), n)
    seeds = set(seeds)
    match = (
        existing["image_id"].isin(wanted).to_numpy()
        & existing["seed"].isin(seeds).to_numpy()
        & (existing["model_id"] == model).to_numpy()
        & (existing["k"] == k).to_numpy()
    )
    rows = np.flatnonzero(match)
    unique = rows[~existing.iloc[rows].duplicated(subset=["image_id", "seed"]).to_numpy()]
    match = np.zeros(n, dtype=bool)
    match[unique] = True  # one row per (image_id, seed)
    seeds_done = existing[match].groupby("image_id")["seed"].nunique()
    done = frozenset(seeds_done.index[seeds_done == len(seeds)])
    carry = match & existing["image_id"].isin(done).to_numpy()
    return NightPlan(len(wanted), done, carry, n)


def drift_status(report: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """``report`` (``pipeline.metrics.drift_report``) with a ``status`` per dataset.

    ``drift`` when p50, p90 or p99 moved by more than ``tolerance``, or the fraction of
    scores at or above the threshold did; ``new`` / ``gone`` when the dataset has scores on
    only one of the two nights; ``ok`` otherwise.
    """
    out = report.copy()
    moved = np.zeros(len(out), dtype=bool)
    for stat in ("p50", "p90", "p99", "above_fraction"):
        moved |= (out[f"diff_{stat}"].abs() > tolerance).fillna(False).to_numpy()
    today = out["today_count"].fillna(0).astype(int).to_numpy() > 0
    before = out["previous_count"].fillna(0).astype(int).to_numpy() > 0
    out["status"] = np.select([today & ~before, ~today & before, moved], [NEW, GONE, DRIFT], OK)
    return out


def drift_markdown(report: pd.DataFrame, date: str, previous: str | None) -> str:
    """A human table of a :func:`drift_status` report."""
    def fmt(v: Any) -> str:
        if v is None or pd.isna(v):
            return "n/a"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    threshold = report["threshold"].iloc[0] if len(report) else float("nan")
    lines = [f"# Score drift {date} vs {previous or 'no previous night'}", "",
             f"Threshold {fmt(threshold)}: scores at or above it count as above.", "",
             "| dataset | status | count | p50 | p90 | p99 | above | above % | "
             "prev p50 | prev p90 | prev p99 | prev above | prev above % |",
             "|" + "---|" * 13]
    for r in report.itertuples(index=False):
        pct = [None if pd.isna(x) else 100 * x for x in (r.today_above_fraction,
                                                       r.previous_above_fraction)]
        cells = [r.dataset, r.status, r.today_count, r.today_p50, r.today_p90, r.today_p99,
                 r.today_above_count, pct[0], r.previous_p50, r.previous_p90, r.previous_p99,
                 r.previous_above_count, pct[1]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# I/O edges: the manifest's queries, partitions of earlier runs, drift files
# --------------------------------------------------------------------------------------------


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return fs, local


def date_queries(manifest: str, schema: pa.Schema, date: str) -> dict[str, str]:
    """``{image_id: dataset}`` of the manifest's valid queries captured on ``date``."""
    if DATE_COLUMN not in schema.names:
        raise ManifestSchemaError(
            f"the nightly run needs a {DATE_COLUMN!r} column (date, timestamp or 'YYYY-MM-DD') "
            f"to pick the queries of a date; manifest {manifest} has none")
    fs, _ = _fs(manifest)
    files = [_fs(f)[1] for f in manifest_files(manifest)]
    columns = [c for c in ("image_uri", "image_id", "dataset", "category", "role", DATE_COLUMN)
               if c in schema.names]
    data = pads.dataset(files, filesystem=fs, format="parquet", schema=schema)
    found: dict[str, str] = {}
    for batch in data.to_batches(columns=columns):
        for raw in batch.to_pylist():
            row = normalize_row(raw)
            if isinstance(row, ManifestRow) and row.role == "query" and row.capture_date == date:
                found.setdefault(row.image_id, row.dataset)
    return found


def _partition_dirs(output: str, table: str, date: str) -> list[tuple[str, str]]:
    """(dataset folder value, partition folder) of every committed ``date`` partition."""
    fs, root = _fs(f"{output}/{table}")
    if not fs.exists(root):
        return []
    out = []
    for path in sorted(fs.glob(f"{root}/dataset=*/run_date={date}")):
        value = path.rstrip("/").split("/")[-2].partition("=")[2]
        out.append((value, path))
    return out


def read_partition(output: str, date: str, table: str = SCORES,
                   columns: Sequence[str] | None = None) -> pa.Table | None:
    """Every dataset's ``date`` rows of ``table`` (all columns, or ``columns``) with a
    ``dataset`` column taken from the folder name, or None when the date has no rows."""
    fs, _ = _fs(output)
    tables = []
    for value, path in _partition_dirs(output, table, date):
        files = [f for f in sorted(fs.glob(f"{path}/*.parquet"))
                 if not f.rpartition("/")[2].startswith((".", "_"))]
        if not files:
            continue
        part = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)
        part = part.append_column("dataset", pa.array([value] * part.num_rows, pa.string()))
        tables.append(part)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def committed_dates(output: str, table: str = SCORES) -> list[str]:
    """Dates with at least one committed partition of ``table``, oldest first."""
    fs, root = _fs(f"{output}/{table}")
    if not fs.exists(root):
        return []
    dates = {p.rstrip("/").rpartition("run_date=")[2]
             for p in fs.glob(f"{root}/dataset=*/run_date=*")}
    return sorted(d for d in dates if d)


def previous_date(output: str, date: str) -> str | None:
    """The latest date before ``date`` with scores: the 'previous night' for drift."""
    earlier = [d for d in committed_dates(output) if d < date]
    return earlier[-1] if earlier else None


def _scores_frame(output: str, date: str | None) -> pd.DataFrame | None:
    if date is None:
        return None
    table = read_partition(output, date, columns=["final_score"])
    return None if table is None else table.to_pandas()


def write_drift(report: pd.DataFrame, out_dir: str, *, date: str, previous: str | None,
                extra: dict) -> dict[str, str]:
    """``drift.parquet``, ``drift.json`` (``{"extra": ..., "records": ...}``) and ``drift.md``."""
    fs, local = _fs(out_dir)
    fs.makedirs(local, exist_ok=True)
    paths = {kind: f"{out_dir}/drift.{kind}" for kind in ("parquet", "json", "md")}
    with fsspec.open(paths["parquet"], "wb") as f:
        report.to_parquet(f, index=False)
    document = {"extra": _jsonable(extra), "records": json.loads(report.to_json(orient="records"))}
    with fsspec.open(paths["json"], "w") as f:
        json.dump(document, f, indent=2, allow_nan=False, default=str)
    with fsspec.open(paths["md"], "w") as f:
        f.write(drift_markdown(report, date, previous))
    return paths


def _write_carried(table: pa.Table, path: str) -> None:
    fs, local = _fs(path)
    fs.makedirs(local.rpartition("/")[0], exist_ok=True)
    with fs.open(local, "wb") as f:
        pq.write_table(table, f)


def _remove_staging(output: str, run_id: str) -> None:
    """This run's staging folder, and the staging root once no run uses it."""
    fs, local = _fs(staging_root(output, run_id))
    if fs.exists(local):
        fs.rm(local, recursive=True)
    parent = local.rpartition("/")[0]
    try:
        if fs.exists(parent) and not fs.ls(parent):
            fs.rmdir(parent)
    except OSError:  # another run started staging meanwhile
        pass


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NightlyOptions:
    """What the nightly run adds to the scoring job's configuration."""

    force: bool = False
    alert_threshold: float = DEFAULT_ALERT_THRESHOLD
    drift_tolerance: float = DEFAULT_DRIFT_TOLERANCE
    fail_on_drift: bool = False


@dataclass
class NightlyReport:
    """What one night did; written as ``nightly.json`` beside the summary."""

    date: str
    run_id: str
    model_id: str
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


def _counter(result, name: str, step: str | None = None) -> int | None:
    """A counter summed over steps (optionally those whose name contains ``step``)."""
    try:
        found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    except Exception as exc:  # some runners report no metrics
        LOG.info("No metrics from this runner (%s)", exc)
        return None
    return sum((c.committed or 0) for c in found if step is None or step in c.key.step)


def _run_job(config: ScoreConfig, schema: pa.Schema, beam_args: Sequence[str], plan: NightPlan,
             carried: pa.Table | None):
    options = PipelineOptions(list(beam_args), save_main_session=False)
    p = beam.Pipeline(runner=make_runner(options), options=options)
    carried_scores = None
    if carried is not None and carried.num_rows:
        path = f"{staging_root(config.output, config.run_id)}/carried/carried.parquet"
        _write_carried(carried, path)
        carried_scores = p | "ReadCarriedScores" >> beam.io.ReadFromParquet(path)
    build_pipeline(p, config, schema, carried_scores=carried_scores,
                   query_filter=NightQueries(config.run_date, plan.skip),
                   reference_filter=KnownReferences(config.run_date))
    result = p.run()
    result.wait_until_finish()
    return result


def run_nightly(config: ScoreConfig, beam_args: Sequence[str],
                options: NightlyOptions = NightlyOptions()) -> NightlyReport:
    """Score ``config.run_date``'s queries into its partition, then report drift."""
    date = config.run_date
    schema = validate_manifest_schema(config.manifest)
    mid = model_id(config.backbone, heads_hash(config.checkpoint))
    runner = PipelineOptions(list(beam_args)).view_as(StandardOptions).runner or "DirectRunner"
    report = NightlyReport(date=date, run_id=config.run_id, model_id=mid,
                           manifest=config.manifest, output=config.output, runner=runner,
                           forced=options.force)
    for table in (SCORES, ERRORS):
        recover_partitions(config.output, table, date)

    queries = date_queries(config.manifest, schema, date)
    existing = read_partition(config.output, date)
    plan = plan_night(list(queries), _keys(existing), model=mid, k=config.k,
                      seeds=config.seeds, force=options.force)
    report.queries_on_date, report.already_scored = plan.queries, len(plan.skip)
    report.scored_queries, report.carried_rows = plan.to_score, plan.carried_rows
    report.dropped_rows = plan.dropped_rows
    LOG.info("Night %s: %d queries captured, %d already scored with %s, %d to score; "
             "%d rows carried, %d dropped", date, plan.queries, len(plan.skip), mid,
             plan.to_score, plan.carried_rows, plan.dropped_rows)

    if plan.queries == 0:
        LOG.warning("The manifest has no query with %s %s: nothing to score; existing "
                    "partitions of that date are left as they are", DATE_COLUMN, date)
        report.skipped = True
    elif plan.up_to_date:
        LOG.info("Partition %s is up to date (use --force to rescore)", date)
        report.skipped = True
    else:
        carried = _carried(existing, plan, queries)
        started = time.monotonic()
        try:
            result = _run_job(config, schema, beam_args, plan, carried)
        finally:
            _remove_staging(config.output, config.run_id)
        report.pipeline_seconds = round(time.monotonic() - started, 3)
        _record_metrics(report, result, cached=bool(config.feature_cache))

    _report_drift(config, options, report)
    summary_dir = f"{config.output}/{SUMMARY}/run_date={date}"
    report.files["report"] = f"{summary_dir}/nightly.json"
    fs, local = _fs(summary_dir)
    fs.makedirs(local, exist_ok=True)
    with fsspec.open(report.files["report"], "w") as f:
        json.dump(_jsonable(dataclasses.asdict(report)), f, indent=2, allow_nan=False, default=str)
    return report


def _keys(existing: pa.Table | None) -> pd.DataFrame:
    columns = ["image_id", "seed", "model_id", "k"]
    return existing.select(columns).to_pandas() if existing is not None else pd.DataFrame(
        columns=columns)


def _carried(existing: pa.Table | None, plan: NightPlan, queries: dict[str, str]
             ) -> pa.Table | None:
    """The existing rows the plan keeps, with the manifest's dataset names."""
    if existing is None or not plan.carried_rows:
        return None
    carried = existing.filter(pa.array(plan.carry))
    # Folder values are sanitised dataset names; carried rows get the manifest's own.
    names = pa.array([queries[i] for i in carried.column("image_id").to_pylist()], pa.string())
    return carried.set_column(carried.schema.get_field_index("dataset"), "dataset", names)


def _record_metrics(report: NightlyReport, result, *, cached: bool) -> None:
    if cached:
        report.reference_cache_hits = _counter(result, "feature_cache_hits")
        report.reference_cache_misses = _counter(result, "feature_cache_misses")
    report.reference_features_extracted = _counter(
        result, "num_inferences", "ExtractReferenceFeatures")
    report.query_features_extracted = _counter(result, "num_inferences", "ExtractQueryFeatures")
    LOG.info("Night %s scored in %.1f s; reference features: %s extracted, %s from the cache",
             report.date, report.pipeline_seconds, report.reference_features_extracted,
             report.reference_cache_hits)


def _report_drift(config: ScoreConfig, options: NightlyOptions, report: NightlyReport) -> None:
    date = config.run_date
    today = _scores_frame(config.output, date)
    if today is None:
        LOG.warning("No scores for %s: no drift report", date)
        return
    before = previous_date(config.output, date)
    report.previous_date = before
    drift = drift_status(drift_report(today, _scores_frame(config.output, before),
                                      threshold=options.alert_threshold),
                         options.drift_tolerance)
    report.drift = json.loads(drift.to_json(orient="records"))
    report.alerts = drift.loc[drift["status"] == DRIFT, "dataset"].tolist()
    out_dir = f"{config.output}/{SUMMARY}/run_date={date}"
    report.files.update(write_drift(
        drift, out_dir, date=date, previous=before,
        extra={"run_date": date, "previous_date": before, "run_id": config.run_id,
               "model_id": report.model_id, "threshold": options.alert_threshold,
               "tolerance": options.drift_tolerance}))
    LOG.info("Drift %s vs %s:\n%s", date, before or "no previous night",
             drift_markdown(drift, date, before))
    for dataset in report.alerts:
        LOG.warning("Score drift in dataset %r between %s and %s (tolerance %.3f)",
                    dataset, before, date, options.drift_tolerance)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _yesterday() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def _fraction(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline nightly",
        description="Score the queries captured on one date into that date's partition: "
                    "incremental, idempotent, with cached reference features and a drift report.")
    add_score_flags(parser)
    g = parser.add_argument_group("nightly")
    g.add_argument("--date", type=_date, default=None,
                   help=f"capture date to score, YYYY-MM-DD (matched against {DATE_COLUMN}; "
                        "default: yesterday, UTC)")
    g.add_argument("--force", action="store_true",
                   help="rescore every query of the date, even those already scored")
    g.add_argument("--no-feature-cache", action="store_true",
                   help="do not cache reference features "
                        f"(default cache: OUTPUT/{FEATURE_CACHE_DIR})")
    g.add_argument("--alert-threshold", type=_fraction, default=DEFAULT_ALERT_THRESHOLD,
                   help="final_score at or above which a query counts as anomalous in the drift "
                        "report (default %(default)s)")
    g.add_argument("--drift-tolerance", type=_fraction, default=DEFAULT_DRIFT_TOLERANCE,
                   help="largest change of a quantile or of the above-threshold fraction that "
                        "is not an alert (default %(default)s)")
    g.add_argument("--fail-on-drift", action="store_true",
                   help=f"exit with code {EXIT_DRIFT} when a dataset drifts")
    return parser


def parse_nightly_args(argv: Sequence[str] | None
                       ) -> tuple[ScoreConfig, NightlyOptions, list[str]]:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    date = args.date
    if date is None:
        date = _yesterday()
        LOG.info("No --date given: scoring yesterday (UTC), %s", date)
    if args.run_date and args.run_date != date:
        parser.error(f"--run-date {args.run_date} differs from --date {date}; the nightly "
                     "partition is the capture date, give only --date")
    args.run_date = date
    if args.no_feature_cache and args.feature_cache:
        parser.error("give either --feature-cache or --no-feature-cache")
    config = score_config_from_args(args)
    cache = None if args.no_feature_cache else (
        args.feature_cache or f"{config.output}/{FEATURE_CACHE_DIR}")
    config = replace(config, only_date=date, feature_cache=cache)
    options = NightlyOptions(force=args.force, alert_threshold=args.alert_threshold,
                             drift_tolerance=args.drift_tolerance,
                             fail_on_drift=args.fail_on_drift)
    return config, options, beam_args


def nightly_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline nightly``; 0 on success, 3 on drift with
    ``--fail-on-drift``."""
    config, options, beam_args = parse_nightly_args(argv)
    report = run_nightly(config, beam_args, options)
    LOG.info("Nightly report: %s", report.files.get("report"))
    if report.alerts and options.fail_on_drift:
        LOG.error("Score drift in %s", ", ".join(report.alerts))
        return EXIT_DRIFT
    return 0


if __name__ == "__main__":  # python -m pipeline.nightly ... (Airflow's Beam operator)
    from pipeline.cli import main

    sys.exit(main(["nightly", *sys.argv[1:]]))
