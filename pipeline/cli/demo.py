"""``python -m pipeline demo``: generate the synthetic demo set, score it, print the summary."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.cli.flags import (add_comparison_model_flags, add_model_flags, add_run_flags,
                                add_scoring_flags, backbone_from_args, parse_with_beam,
                                score_config_from_args)
from pipeline.core.layout import summary_dir
from pipeline.model.scorers.suite import SuiteSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline demo",
                                     description="Generate, score and summarise the demo set.")
    parser.add_argument("--workdir", default="demo_output", help="where data and results go")
    add_scoring_flags(parser, seeds=(0, 1, 2))
    add_run_flags(parser)
    add_model_flags(parser)
    add_comparison_model_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.demo import demo_backbone, demo_paths, run_demo
    from pipeline.report import INDEX, report_dir

    args, beam_args = parse_with_beam(build_parser(), argv)
    paths = demo_paths(args.workdir)
    backbone = backbone_from_args(args)
    if SuiteSpec(args.scorer).uses_clip:  # a CLIP-free run needs no CLIP weights at all
        backbone = demo_backbone(backbone)
    # The demo shows where the anomalies are: its maps feed the report.
    config = score_config_from_args(args, manifest=paths.manifest, output=paths.output,
                                    backbone=backbone, write_anomaly_maps=True)
    comparison = run_demo(paths, config, beam_args)
    folder = summary_dir(config.output, config.run_date)
    sys.stdout.write(comparison.rstrip("\n") + "\n\n")
    sys.stdout.write(f"Scores:     {config.output}/scores/  (hive-partitioned Parquet)\n"
                     f"Errors:     {config.output}/errors/\n"
                     f"Summary:    {folder}/summary.md  (per category)\n"
                     f"Comparison: {folder}/comparison.md\n"
                     f"Report:     {report_dir(config.output, config.run_date)}/{INDEX}  "
                     "(open it in a browser)\n")
    return 0
