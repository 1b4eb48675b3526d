"""``python -m pipeline nightly``: score one capture date's queries into that date's partition."""
from __future__ import annotations

import argparse
import datetime as dt
import logging
from typing import Sequence

from pipeline.cli.flags import (add_score_flags, finite_float, iso_date, parse_with_beam,
                                score_config_from_args)
from pipeline.core.config import ScoreConfig
from pipeline.core.layout import FEATURE_CACHE_DIR, feature_cache_dir
from pipeline.core.preflight import check_writable
from pipeline.nightly.job import (DATE_COLUMN, DEFAULT_DRIFT_TOLERANCE, EXIT_DRIFT,
                                  NightlyOptions, run_nightly)

LOG = logging.getLogger(__name__)


def _yesterday() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline nightly",
        description="Score the queries captured on one date into that date's partition: "
                    "incremental, idempotent, with cached reference features and a drift report.")
    add_score_flags(parser)
    g = parser.add_argument_group("nightly")
    g.add_argument("--date", type=iso_date, default=None,
                   help=f"capture date to score, YYYY-MM-DD (matched against {DATE_COLUMN}; "
                        "default: yesterday, UTC)")
    g.add_argument("--force", action="store_true",
                   help="rescore every query of the date, even those already scored")
    g.add_argument("--no-feature-cache", action="store_true",
                   help="do not cache reference features "
                        f"(default cache: OUTPUT/{FEATURE_CACHE_DIR})")
    g.add_argument("--alert-threshold", type=finite_float, default=None,
                   help="deprecated: alerts count the calibrated decisions (--false-alarm-rate) "
                        "per line; a threshold only adds the count of final_score at or above "
                        "it to the drift report")
    g.add_argument("--drift-tolerance", type=finite_float, default=DEFAULT_DRIFT_TOLERANCE,
                   help="largest change of a line's anomaly rate (or of a score quantile) "
                        "that is not an alert (default %(default)s)")
    g.add_argument("--fail-on-drift", action="store_true",
                   help=f"exit with code {EXIT_DRIFT} when a dataset drifts")
    return parser


def parse_nightly_args(argv: Sequence[str] | None
                       ) -> tuple[ScoreConfig, NightlyOptions, list[str]]:
    parser = build_parser()
    args, beam_args = parse_with_beam(parser, argv)
    date = args.date
    if date is None:
        date = _yesterday()
        LOG.info("No --date given: scoring yesterday (UTC), %s", date)
    if args.run_date and args.run_date != date:
        parser.error(f"--run-date {args.run_date} differs from --date {date}; the nightly "
                     "partition is the capture date, give only --date")
    if args.no_feature_cache and args.feature_cache:
        parser.error("give either --feature-cache or --no-feature-cache")
    output = args.output.rstrip("/")
    cache = None if args.no_feature_cache else (args.feature_cache or feature_cache_dir(output))
    config = score_config_from_args(args, run_date=date, feature_cache=cache)
    if args.alert_threshold is not None:
        LOG.warning("--alert-threshold is deprecated: alerts now count each line's calibrated "
                    "decisions (is_anomalous at --false-alarm-rate %g) and drift follows its "
                    "anomaly rate; the threshold only adds the count of raw scores at or above "
                    "%g to the drift report", config.false_alarm_rate, args.alert_threshold)
    options = NightlyOptions(force=args.force, alert_threshold=args.alert_threshold,
                             drift_tolerance=args.drift_tolerance,
                             fail_on_drift=args.fail_on_drift, lock_wait_s=args.lock_wait)
    return config, options, beam_args


def main(argv: Sequence[str] | None = None) -> int:
    """0 on success, 3 on drift with ``--fail-on-drift``."""
    config, options, beam_args = parse_nightly_args(argv)
    check_writable(config.output)
    report = run_nightly(config, beam_args, options)
    LOG.info("Nightly report: %s", report.files.get("report"))
    if report.alerts and options.fail_on_drift:
        LOG.error("Score drift in %s", ", ".join(report.alerts))
        return EXIT_DRIFT
    return 0
