"""``python -m pipeline make-manifest``: a Parquet manifest from MVTec-AD / VisA-style trees."""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from pipeline.core.make_manifest import make_manifest, summarize
from pipeline.core.manifest import write_manifest

LOG = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline make-manifest",
        description=(
            "Build a Parquet manifest from MVTec-AD / VisA-style folder trees "
            "(<root>/<category>/train/good, test/good, test/<defect>)."
        ),
    )
    parser.add_argument(
        "--root", action="append", required=True,
        help="dataset root folder or fsspec URL; repeat for several datasets",
    )
    parser.add_argument(
        "--dataset", action="append", default=None,
        help="dataset name for the matching --root (default: the root's basename); "
        "give one per --root or none",
    )
    parser.add_argument(
        "--output", required=True, help="Parquet file to write (path or fsspec URL)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset is not None and len(args.dataset) != len(args.root):
        parser.error(
            f"got {len(args.root)} --root but {len(args.dataset)} --dataset; "
            "give one --dataset per --root, or none"
        )
    names: list[Optional[str]] = args.dataset or [None] * len(args.root)
    try:
        df = make_manifest(list(zip(args.root, names)))
        write_manifest(df, args.output)
    except (ValueError, OSError) as exc:
        LOG.error("make-manifest failed: %s", exc)
        return 1
    LOG.info("wrote %d rows to %s (%s)", len(df), args.output, summarize(df))
    return 0
