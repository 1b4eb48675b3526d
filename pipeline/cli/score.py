"""``python -m pipeline score``: score every query of a manifest against few-shot references."""
from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.cli.flags import add_score_flags, parse_with_beam, score_config_from_args
from pipeline.core.config import ScoreConfig
from pipeline.core.preflight import check_writable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline score",
        description="Score every query image of a manifest against few-shot normal references. "
                    "Flags not listed here go to Apache Beam (--runner, Dataflow, Flink, Dask).")
    add_score_flags(parser)
    return parser


def parse_score_args(argv: Sequence[str] | None) -> tuple[ScoreConfig, list[str]]:
    args, beam_args = parse_with_beam(build_parser(), argv)
    return score_config_from_args(args), beam_args


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.run import run_score

    config, beam_args = parse_score_args(argv)
    check_writable(config.output)
    run_score(config, beam_args)
    return 0
