"""``python -m pipeline vacuum``: remove now what dead runs left under an output root."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.cli.flags import add_vacuum_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline vacuum",
        description="Collect the files of runs that died (their lock is gone): every file "
                    "of theirs that no commit record in force names. Every score and "
                    "nightly run does the same when it starts; this does it on demand.")
    add_vacuum_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.core.vacuum import vacuum

    args = build_parser().parse_args(argv)
    output = args.output.rstrip("/")
    found = vacuum(output, dry_run=args.dry_run, deep=args.deep)
    verb = "would remove" if args.dry_run else "removed"
    out = sys.stdout
    for path in found.removed:
        out.write(f"{verb} {output}/{path}\n")
    for date in found.skipped_dates:
        out.write(f"skipped {date}: a live run holds its lock and collects at its end\n")
    out.write(f"{len(found.runs)} dead runs, {len(found.removed)} files or folders {verb}\n")
    return 0
