"""``python -m pipeline report``: (re)write a date's HTML report from its committed outputs."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.cli.flags import iso_date, non_negative_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline report",
        description="Write OUT/report/run_date=<date>/index.html from the date's committed "
                    "scores, errors, summary and (nightly) drift files.")
    parser.add_argument("--output", required=True, help="output root of the scoring runs")
    parser.add_argument("--date", type=iso_date, required=True, help="run date YYYY-MM-DD")
    parser.add_argument("--top-n", type=non_negative_int, default=8,
                        help="most anomalous queries shown per dataset (default %(default)s)")
    parser.add_argument("--history-nights", type=non_negative_int, default=14,
                        help="nights of score quantiles and alerts plotted (default "
                             "%(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.report import build_report

    args = build_parser().parse_args(argv)
    path = build_report(args.output.rstrip("/"), args.date, top_n=args.top_n,
                        history_nights=args.history_nights)
    sys.stdout.write(f"Report: {path}\n")
    return 0
