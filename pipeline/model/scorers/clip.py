"""InCTRL's feature extractor: the frozen open_clip CLIP image tower's patch tokens of a few
blocks and its image embedding (``pipeline.model.backbone``), behind the extractor seam.

Features: ``tokens`` (B, layers, patches, width) and ``embeds`` (B, embed_dim), float32.
Its identity is the backbone's ``feature_id`` (architecture, weights, blocks, precision),
the key of the feature cache the training job fills too.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from pipeline.model.backbone import BackboneSpec, describe, get_backbone
from pipeline.model.maps import InputGeometry
from pipeline.model.scorers.base import ExtractorEntry, Features, Models

CLIP = "clip"
TOKENS, EMBEDS = "tokens", "embeds"


class ClipExtractor:
    """Patch tokens of InCTRL's blocks and the image embedding of the CLIP image tower."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.backbone = get_backbone(spec)
        self.identity = spec.feature_id

    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → {tokens: (B, layers, patches, width), embeds: (B, embed_dim)}."""
        feats = self.backbone.encode_images(pixels)
        return {TOKENS: feats.tokens, EMBEDS: feats.embeds}


class ClipEntry(ExtractorEntry):
    """The run's CLIP model (``--backbone``, ``--pretrained``, ``--blocks``, ``--precision``)."""

    name = CLIP
    view = CLIP
    clip_based = True

    def spec(self, models: Models, needs: Sequence[Mapping[str, Any]]) -> BackboneSpec:
        return models.clip

    def preprocess(self, spec: BackboneSpec) -> Callable[[Any], torch.Tensor]:
        return describe(spec).preprocess

    def identity(self, spec: BackboneSpec) -> str:
        return spec.feature_id

    def load(self, spec: BackboneSpec) -> ClipExtractor:
        return ClipExtractor(spec)

    def geometry(self, spec: BackboneSpec, grid: tuple[int, int]) -> InputGeometry:
        """open_clip's transform: the shorter side resized to the input size, center crop."""
        side = describe(spec).geometry.image_size
        return InputGeometry.center_crop(side[0], side)

    def descriptor(self, features: Features) -> torch.Tensor:
        """The image embedding."""
        return features[EMBEDS]

    def model_of(self, spec: BackboneSpec) -> tuple[str, str]:
        return spec.name, spec.weights_id



CLIP_ENTRY = ClipEntry()
