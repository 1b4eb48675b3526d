"""Command line: ``python -m pipeline {score, demo, make-manifest, import-checkpoint, ...}``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

LOG = logging.getLogger("pipeline")


def _score(argv: list[str]) -> int:
    from pipeline.run import run

    run(argv)
    return 0


def _demo(argv: list[str]) -> int:
    from pipeline.demo_job import demo_main

    return demo_main(argv)


def _make_manifest(argv: list[str]) -> int:
    from pipeline.manifest import make_manifest_main

    return make_manifest_main(argv)


def _import_checkpoint(argv: list[str]) -> int:
    from pipeline.model.backbone import (DEFAULT_BACKBONE, DEFAULT_PRETRAINED, BackboneSpec,
                                         describe)
    from pipeline.model.checkpoint import (CheckpointError, HeadsMetadata,
                                           import_official_checkpoint, save_heads)

    parser = argparse.ArgumentParser(
        prog="python -m pipeline import-checkpoint",
        description="Convert an official InCTRL checkpoint's adapter and heads to safetensors.")
    parser.add_argument("source", help="official InCTRL .pyth/.pt file (read with weights_only)")
    parser.add_argument("output", help="heads .safetensors to write")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--pretrained", default=DEFAULT_PRETRAINED)
    parser.add_argument("--k", type=int, default=4, help="shots the checkpoint was trained with")
    args = parser.parse_args(argv)

    heads = import_official_checkpoint(args.source)
    geometry = describe(BackboneSpec(args.backbone, args.pretrained)).geometry
    if (heads.embed_dim, heads.num_patches) != (geometry.embed_dim, geometry.num_patches):
        raise CheckpointError(
            f"{args.source} holds heads for embed_dim={heads.embed_dim}, "
            f"patches={heads.num_patches}; {args.backbone} has embed_dim={geometry.embed_dim}, "
            f"patches={geometry.num_patches}")
    meta = HeadsMetadata(
        backbone=args.backbone, pretrained=args.pretrained, blocks=geometry.blocks,
        image_size=geometry.image_size, embed_dim=heads.embed_dim,
        num_patches=heads.num_patches, k=args.k, extra={"imported_from": args.source},
    )
    digest = save_heads(heads, args.output, meta)
    LOG.info("Wrote %s (heads %s)", args.output, digest)
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "score": (_score, "score a manifest's queries (the main job)"),
    "demo": (_demo, "generate the synthetic demo set, score it, print the summary"),
    "make-manifest": (_make_manifest, "build a manifest from MVTec/VisA-style folders"),
    "import-checkpoint": (_import_checkpoint, "convert official InCTRL heads to safetensors"),
}


def _register_optional() -> None:
    try:
        from pipeline.train_cli import train_main

        COMMANDS["train"] = (train_main, "train the adapter and heads on an auxiliary manifest")
    except ImportError:
        pass
    try:
        from pipeline.nightly import nightly_main

        COMMANDS["nightly"] = (nightly_main, "score one date's queries, idempotently")
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _register_optional()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        out.write("usage: python -m pipeline <command> [options]\n\ncommands:\n"
                  + "\n".join(lines) + "\n")
        if argv and argv[0] not in ("-h", "--help"):
            out.write(f"\nunknown command {argv[0]!r}\n")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    from pipeline.manifest import ManifestSchemaError
    from pipeline.model.backbone import BackboneLoadError
    from pipeline.model.checkpoint import CheckpointError

    try:
        return COMMANDS[command][0](rest)
    except (ManifestSchemaError, CheckpointError, BackboneLoadError) as exc:
        # Problems of the user's inputs: one clear line, no traceback.
        LOG.error("%s failed: %s", command, exc)
        return 1
