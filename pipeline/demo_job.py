"""The embedded demo: synthetic MVTec-layout datasets, scored end to end on the DirectRunner."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import fsspec

from pipeline.config import ScoreConfig, add_model_flags, backbone_from_args
from pipeline.demo import generate_demo
from pipeline.manifest import make_manifest, write_manifest
from pipeline.model.backbone import tiny_spec, weights_obtainable
from pipeline.run import run_config
from pipeline.schemas import SUMMARY

LOG = logging.getLogger(__name__)


def demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline demo",
                                     description="Generate, score and summarise the demo set.")
    parser.add_argument("--workdir", default="demo_output", help="where data and results go")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    add_model_flags(parser)
    args, beam_args = parser.parse_known_args(argv)

    spec = backbone_from_args(args)
    if not weights_obtainable(spec):
        LOG.warning(
            "!!! Pretrained weights %s are neither cached nor downloadable here. The DEMO falls "
            "back to the tiny random test backbone; every output row says so in its model_id. "
            "Scores from it show the pipeline working, not detection quality. !!!",
            spec.backbone_id)
        spec = tiny_spec(args.device, spec.precision)

    workdir = os.path.abspath(args.workdir)
    data_root = os.path.join(workdir, "data")
    roots = generate_demo(data_root, seed=0)
    manifest_path = os.path.join(workdir, "manifest.parquet")
    write_manifest(make_manifest(roots), manifest_path)
    output = os.path.join(workdir, "results")
    config = ScoreConfig(
        manifest=manifest_path, output=output, k=args.k,
        seeds=tuple(int(s) for s in args.seeds.split(",")), backbone=spec,
        checkpoint=args.checkpoint, batch_size=args.batch_size,
    )
    run_config(config, beam_args)
    summary_md = f"{output}/{SUMMARY}/run_date={config.run_date}/summary.md"
    with fsspec.open(summary_md, "r") as f:
        sys.stdout.write(f.read() + "\n")
    sys.stdout.write(f"Scores:  {output}/scores/  (hive-partitioned Parquet)\n"
                     f"Errors:  {output}/errors/\nSummary: {summary_md}\n")
    return 0


