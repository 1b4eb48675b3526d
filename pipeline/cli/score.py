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


def parse_score_command(argv: Sequence[str] | None) -> tuple[ScoreConfig, list[str], float]:
    """(configuration, Beam's flags, seconds to wait for the date's lock)."""
    args, beam_args = parse_with_beam(build_parser(), argv)
    return score_config_from_args(args), beam_args, args.lock_wait


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.run import run_score

    config, beam_args, lock_wait = parse_score_command(argv)
    check_writable(config.output)
    run_score(config, beam_args, lock_wait_s=lock_wait)
    return 0
