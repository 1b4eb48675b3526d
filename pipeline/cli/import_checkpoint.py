"""``python -m pipeline import-checkpoint``: an official InCTRL checkpoint → safetensors heads
plus the checkpoint's own CLIP towers beside them."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from pipeline.cli.flags import positive_int
from pipeline.core.config import DEFAULT_K
from pipeline.model.backbone import DEFAULT_BACKBONE, BackboneSpec, describe
from pipeline.model.checkpoint import TOWERS_SUFFIX, convert_official_checkpoint
from pipeline.model.weights import RANDOM_PREFIX

LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline import-checkpoint",
        description="Convert an official InCTRL checkpoint: its adapter and heads to a "
                    f"safetensors heads file, its CLIP towers to <heads stem>{TOWERS_SUFFIX} "
                    "beside it. Score with --checkpoint HEADS alone to run the official model.")
    parser.add_argument("source", help="official InCTRL .pyth/.pt file (read with weights_only)")
    parser.add_argument("output", help="heads .safetensors to write")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help="open_clip model name of the checkpoint's towers "
                             "(default %(default)s)")
    parser.add_argument("--k", type=positive_int, default=DEFAULT_K,
                        help="shots the checkpoint was trained with")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The geometry comes from the model config alone; the weights come from the checkpoint.
    geometry = describe(BackboneSpec(args.backbone, RANDOM_PREFIX)).geometry
    digest = convert_official_checkpoint(args.source, args.output, backbone=args.backbone,
                                         geometry=geometry, k=args.k)
    LOG.info("Wrote %s (heads %s) and its CLIP towers", args.output, digest)
    return 0
