"""Command line: ``python -m pipeline {score, nightly, train, demo, report, vacuum,
make-manifest, import-checkpoint}``.

Layer 5, the top: each command's module (imported only when it runs) parses its flags into a
configuration and calls its job. An error inside a command's import is a traceback, never
an "unknown command".
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

LOG = logging.getLogger(__name__)

#: Exit status when another run holds (or took over) the date: nothing was published.
EXIT_LOCKED = 4

#: command → (module with ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("pipeline.cli.score", "score a manifest's queries (the main job)"),
    "nightly": ("pipeline.cli.nightly", "score one date's queries, idempotently"),
    "train": ("pipeline.cli.train", "train the adapter and heads on an auxiliary manifest"),
    "demo": ("pipeline.cli.demo", "generate the synthetic demo set, score it, print the summary"),
    "report": ("pipeline.cli.report", "write a date's HTML report from its committed outputs"),
    "vacuum": ("pipeline.cli.vacuum", "remove the files of runs that died (--dry-run: list them)"),
    "make-manifest": ("pipeline.cli.make_manifest",
                      "build a manifest from datasets as they ship or plain folders"),
    "import-checkpoint": ("pipeline.cli.import_checkpoint",
                          "convert official InCTRL heads to safetensors"),
}


def _usage() -> str:
    lines = [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: python -m pipeline <command> [options] [--verbose]\n\ncommands:\n"
            + "\n".join(lines) + "\n\n--verbose: the full log (Beam's and open_clip's INFO "
            "lines too)\n")


#: Flag of every command: the full INFO log (Beam's and open_clip's included).
VERBOSE = "--verbose"


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.core.console import configure_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE in argv
    argv = [a for a in argv if a != VERBOSE]
    configure_logging(verbose)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(_usage() + f"\nunknown command {command!r}\n")
        return 2
    run = importlib.import_module(COMMANDS[command][0]).main
    from pipeline.core.commit import CommitConflict
    from pipeline.core.failures import EXIT_TOO_MANY_FAILURES, TooManyFailures
    from pipeline.core.locks import LockHeld, LockLost, StoreNotExclusive
    from pipeline.core.manifest import ManifestSchemaError
    from pipeline.core.preflight import OutputNotWritableError
    from pipeline.model.backbone import BackboneLoadError
    from pipeline.model.checkpoint import CheckpointError
    from pipeline.model.compiled import RuntimeUnavailable
    from pipeline.model.precision import PrecisionError

    try:
        return run(rest)
    except (ManifestSchemaError, CheckpointError, BackboneLoadError, PrecisionError,
            RuntimeUnavailable, OutputNotWritableError, StoreNotExclusive) as exc:
        # Problems of the user's inputs: one clear line, no traceback.
        LOG.error("%s failed: %s", command, exc)
        return 1
    except (LockHeld, LockLost, CommitConflict) as exc:
        # Another run of the same date: nothing of this run was published.
        LOG.error("%s did not run: %s", command, exc)
        return EXIT_LOCKED
    except TooManyFailures as exc:
        # A systematic failure: the previous record stays in force.
        LOG.error("%s failed: %s", command, exc)
        return EXIT_TOO_MANY_FAILURES
