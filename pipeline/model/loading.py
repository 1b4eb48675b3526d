"""Process-wide loading of the scorer (backbone geometry + optional heads) and model ids."""
from __future__ import annotations

import logging
import threading

import fsspec

from pipeline.model.backbone import BackboneSpec, Geometry, describe
from pipeline.model.checkpoint import CheckpointError, file_hash, load_heads
from pipeline.model.inctrl import InCTRLScorer

LOG = logging.getLogger(__name__)

_SCORERS: dict[tuple[BackboneSpec, str | None], tuple[InCTRLScorer, str]] = {}
_LOCK = threading.Lock()

TRAINING_FREE = "training-free"
WITH_HEADS = "inctrl-heads"


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
    """What produced a score: backbone, weights, blocks and heads. Written to every output row."""
    blocks = ",".join(str(b) for b in spec.blocks) if spec.blocks else "default"
    return f"{spec.backbone_id}|blocks={blocks}|heads={heads}"


def build_scorer(geometry: Geometry, checkpoint: str | None, spec: BackboneSpec) -> tuple[InCTRLScorer, str]:
    """The scorer for a backbone geometry with heads from ``checkpoint`` (or none)."""
    if not checkpoint:
        return InCTRLScorer(geometry).eval(), "none"
    heads, meta, digest = load_heads(checkpoint)
    if (meta.embed_dim, meta.num_patches) != (geometry.embed_dim, geometry.num_patches):
        raise CheckpointError(
            f"{checkpoint} was trained for embed_dim={meta.embed_dim}, patches={meta.num_patches} "
            f"({meta.backbone}); the backbone {spec.backbone_id} has embed_dim="
            f"{geometry.embed_dim}, patches={geometry.num_patches}"
        )
    if meta.backbone != spec.name or tuple(meta.blocks) != tuple(geometry.blocks):
        LOG.warning("Heads %s were trained on %s blocks %s; scoring with %s blocks %s",
                    checkpoint, meta.backbone, meta.blocks, spec.name, geometry.blocks)
    return InCTRLScorer(geometry, heads).eval(), digest


def get_scorer(spec: BackboneSpec, checkpoint: str | None) -> tuple[InCTRLScorer, str]:
    """One scorer per (backbone, checkpoint) per process, on the backbone's device."""
    key = (spec, checkpoint)
    with _LOCK:
        cached = _SCORERS.get(key)
    if cached is not None:
        return cached
    info = describe(spec)  # the scorer needs geometry and device, not the backbone itself
    scorer, digest = build_scorer(info.geometry, checkpoint, spec)
    scorer = scorer.to(info.device)
    with _LOCK:
        _SCORERS.setdefault(key, (scorer, digest))
        return _SCORERS[key]
