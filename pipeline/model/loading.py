"""Process-wide loading of InCTRL's model (backbone geometry + optional heads), the backbone
a heads file runs on, and its model id."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import fsspec

from pipeline.model.backbone import (
    BackboneSpec,
    Geometry,
    default_blocks,
    describe,
)
from pipeline.model.checkpoint import (
    CheckpointError,
    HeadsMetadata,
    file_hash,
    load_heads,
    read_heads_metadata,
    towers_location,
)
from pipeline.model.inctrl import InCTRLModel
from pipeline.model.shared import shared
from pipeline.model.weights import file_sha256

LOG = logging.getLogger(__name__)


def heads_hash(checkpoint: str | None) -> str:
    """Content hash of a heads file, or 'none' for training-free scoring."""
    if not checkpoint:
        return "none"
    try:
        with fsspec.open(checkpoint, "rb") as f:
            return file_hash(f.read())
    except FileNotFoundError as exc:
        raise CheckpointError(f"heads checkpoint not found: {checkpoint}") from exc


def model_id(spec: BackboneSpec, heads: str) -> str:
    """What produced a score: backbone, weights, blocks, heads and, unless fp32, the
    precision (fp32 ids are those of the runs before it was recorded). Written to every
    output row."""
    blocks = ",".join(str(b) for b in spec.blocks) if spec.blocks else "default"
    precision = f"|precision={spec.precision}" if spec.precision != "fp32" else ""
    return f"{spec.backbone_id}|blocks={blocks}|heads={heads}{precision}"


def _same_weights(given: str, recorded: str) -> bool:
    """Whether a pretrained value names the weights recorded in heads metadata: the same
    value, or a file of the same name (metadata records where training read it)."""
    if given == recorded:
        return True
    return os.path.isfile(given) and Path(given).name == Path(recorded).name


def backbone_for_heads(checkpoint: str, *, name: str | None = None,
                       pretrained: str | None = None, blocks: tuple[int, ...] = (),
                       device: str = "cpu", precision: str = "fp32") -> BackboneSpec:
    """The backbone the heads in ``checkpoint`` run on, from their metadata.

    ``name``, ``pretrained`` and ``blocks`` are what the user asked for explicitly (None or
    empty: not asked). Heads that carry their own towers run on them (checked by sha256
    when loaded); others on the weights they were trained with. Anything asked for that
    contradicts the metadata, or a geometry the heads do not fit, is a CheckpointError.
    """
    meta = read_heads_metadata(checkpoint)
    if name is not None and name != meta.backbone:
        raise CheckpointError(f"{checkpoint} holds heads for backbone {meta.backbone!r}, not "
                              f"{name!r}; leave the backbone unset to use theirs")
    if meta.towers:
        weights, sha256 = towers_location(checkpoint, meta), meta.towers_sha256
        if pretrained is not None and pretrained != weights and not (
                os.path.isfile(pretrained) and file_sha256(pretrained) == sha256):
            raise CheckpointError(
                f"{checkpoint} runs on its own CLIP towers {meta.towers} (sha256 "
                f"{sha256[:12]}...); pretrained={pretrained!r} is other weights. Leave "
                "pretrained unset to use the towers")
    else:
        if pretrained is not None and not _same_weights(pretrained, meta.pretrained):
            raise CheckpointError(
                f"{checkpoint} holds heads trained on pretrained={meta.pretrained!r}, not "
                f"{pretrained!r}; leave pretrained unset to use theirs")
        weights, sha256 = (meta.pretrained if pretrained is None else pretrained), ""
    spec = BackboneSpec(name=meta.backbone, pretrained=weights, blocks=tuple(blocks),
                        device=device, precision=precision, weights_sha256=sha256)
    geometry = describe(spec).geometry
    if blocks and geometry.blocks != tuple(meta.blocks):
        raise CheckpointError(f"{checkpoint} holds heads for blocks {list(meta.blocks)}, not "
                              f"{list(geometry.blocks)}; leave blocks unset to use theirs")
    _check_geometry(checkpoint, meta, geometry, spec)
    if not blocks and tuple(meta.blocks) != default_blocks(geometry.depth):
        spec = BackboneSpec(name=spec.name, pretrained=spec.pretrained, blocks=tuple(meta.blocks),
                            device=device, precision=precision, weights_sha256=sha256)
    return spec


def _check_geometry(checkpoint: str, meta: HeadsMetadata, geometry: Geometry,
                    spec: BackboneSpec) -> None:
    if (meta.embed_dim, meta.num_patches) != (geometry.embed_dim, geometry.num_patches) or \
            tuple(meta.image_size) != tuple(geometry.image_size):
        raise CheckpointError(
            f"{checkpoint} was trained for embed_dim={meta.embed_dim}, patches={meta.num_patches}"
            f", images {tuple(meta.image_size)} ({meta.backbone}); the backbone "
            f"{spec.backbone_id} has embed_dim={geometry.embed_dim}, patches="
            f"{geometry.num_patches}, images {tuple(geometry.image_size)}"
        )


def build_model(geometry: Geometry, checkpoint: str | None, spec: BackboneSpec) -> tuple[InCTRLModel, str]:
    """The InCTRL model for a backbone geometry with heads from ``checkpoint`` (or none).

    Heads that carry their own towers are refused on any other backbone weights: see
    ``backbone_for_heads``."""
    if not checkpoint:
        return InCTRLModel(geometry).eval(), "none"
    heads, meta, digest = load_heads(checkpoint)
    if meta.towers and spec.weights_sha256 != meta.towers_sha256:
        raise CheckpointError(
            f"{checkpoint} runs on its own CLIP towers {meta.towers} (sha256 "
            f"{meta.towers_sha256[:12]}...), not on {spec.backbone_id}; build the backbone "
            "with backbone_for_heads (score --checkpoint without --pretrained)")
    if (meta.embed_dim, meta.num_patches) != (geometry.embed_dim, geometry.num_patches):
        raise CheckpointError(
            f"{checkpoint} was trained for embed_dim={meta.embed_dim}, patches={meta.num_patches} "
            f"({meta.backbone}); the backbone {spec.backbone_id} has embed_dim="
            f"{geometry.embed_dim}, patches={geometry.num_patches}"
        )
    if meta.backbone != spec.name or tuple(meta.blocks) != tuple(geometry.blocks):
        LOG.warning("Heads %s were trained on %s blocks %s; scoring with %s blocks %s",
                    checkpoint, meta.backbone, meta.blocks, spec.name, geometry.blocks)
    return InCTRLModel(geometry, heads).eval(), digest


def get_model(spec: BackboneSpec, checkpoint: str | None) -> tuple[InCTRLModel, str]:
    """One InCTRL model per (backbone, checkpoint) per process, on the backbone's device."""
    def load() -> tuple[InCTRLModel, str]:
        info = describe(spec)  # the model needs geometry and device, not the backbone itself
        model, digest = build_model(info.geometry, checkpoint, spec)
        return model.to(info.device), digest

    return shared("inctrl", (spec, checkpoint), load)
