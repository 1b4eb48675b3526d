"""``python -m pipeline import-checkpoint``: official InCTRL heads → safetensors heads."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from pipeline.cli.flags import positive_int
from pipeline.core.config import DEFAULT_K
from pipeline.model.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, BackboneSpec, describe
from pipeline.model.checkpoint import convert_official_checkpoint

LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline import-checkpoint",
        description="Convert an official InCTRL checkpoint's adapter and heads to safetensors.")
    parser.add_argument("source", help="official InCTRL .pyth/.pt file (read with weights_only)")
    parser.add_argument("output", help="heads .safetensors to write")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="open_clip model name")
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                        help="the weights the heads were trained on")
    parser.add_argument("--k", type=positive_int, default=DEFAULT_K,
                        help="shots the checkpoint was trained with")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    geometry = describe(BackboneSpec(args.backbone, args.pretrained)).geometry
    digest = convert_official_checkpoint(args.source, args.output, backbone=args.backbone,
                                         pretrained=args.pretrained, geometry=geometry, k=args.k)
    LOG.info("Wrote %s (heads %s)", args.output, digest)
    return 0
