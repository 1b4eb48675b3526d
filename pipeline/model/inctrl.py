"""InCTRL scoring: residuals of a query against its few-shot normal references.

``InCTRLModel`` holds the (optional) trained heads and does all per-batch tensor work;
reference sets and text priors are prepared once per group and passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.backbone import ClipBackbone, Geometry, ImageFeatures
from pipeline.model.heads import InCTRLHeads
from pipeline.model.prompts import DEFAULT_SEMANTIC_CLASSES, prompts_for
from pipeline.model.residual import (
    Bf16Rows,
    bf16_reference_rows,
    image_residual,
    normalize_reference_tokens,
    patch_anomaly_map,
    text_prior,
)


@dataclass
class ReferenceSet:
    """A group's k normal references, prepared once and reused for every query.

    tokens_unit:   (layers, k * patches, width) unit-norm patch tokens
    embeds:        (k, embed_dim) raw image embeddings
    adapted_mean:  (embed_dim,) mean adapted embedding, or None without heads
    tokens_bf16:   the raw tokens where they are all bf16 values on a CPU with bf16 units
                   (a bf16 run), for the residual's exact bf16-product path; None otherwise
    """

    tokens_unit: torch.Tensor
    embeds: torch.Tensor
    adapted_mean: torch.Tensor | None
    k: int
    tokens_bf16: Bf16Rows | None = None


@dataclass
class ScoreComponents:
    """Every score InCTRL produces for a batch of queries; each tensor is (batch,) unless noted.

    final:          the reported anomaly score ((holistic + fine) / 2, or fine without heads)
    fine:           max over patches of the patch residual map
    holistic:       holistic head output (NaN without heads)
    image_residual: image-residual head output (NaN without heads)
    text_prior:     zero-shot prompt prior
    patch_map:      (batch, patches) mean patch residual map
    """

    final: torch.Tensor
    fine: torch.Tensor
    holistic: torch.Tensor
    image_residual: torch.Tensor
    text_prior: torch.Tensor
    patch_map: torch.Tensor


def build_text_features(
    backbone: ClipBackbone,
    category: str,
    semantic_classes: frozenset[str] = DEFAULT_SEMANTIC_CLASSES,
) -> torch.Tensor:
    """Normal and anomalous prompt-ensemble embeddings for one category: (2, embed_dim), unit rows."""
    return encode_prompt_pair(backbone, *prompts_for(category, semantic_classes))


def encode_prompt_pair(backbone: ClipBackbone, normal: list[str], anomalous: list[str]) -> torch.Tensor:
    """Encode, normalise, average per side, normalise again: (2, embed_dim)."""
    sides = [F.normalize(backbone.encode_texts(texts).mean(dim=0), dim=-1)
             for texts in (normal, anomalous)]
    return torch.stack(sides)


class InCTRLModel(nn.Module):
    """Scores query features against a prepared reference set; heads are optional.

    Without heads the model is training-free: the final score is the fine-grained patch
    residual, and the text prior is reported beside it.
    """

    def __init__(self, geometry: Geometry, heads: InCTRLHeads | None = None) -> None:
        super().__init__()
        if heads is not None and (
            heads.embed_dim != geometry.embed_dim or heads.num_patches != geometry.num_patches
        ):
            raise ValueError(
                f"heads were built for embed_dim={heads.embed_dim}, patches={heads.num_patches}; "
                f"the backbone has embed_dim={geometry.embed_dim}, patches={geometry.num_patches}"
            )
        self.geometry = geometry
        self.heads = heads

    @property
    def has_heads(self) -> bool:
        return self.heads is not None

    def prepare_references(self, refs: ImageFeatures) -> ReferenceSet:
        """Normalise and pool reference tokens and adapt their embeddings, once per group.

        refs: tokens (k, layers, patches, width), embeds (k, embed_dim)
        """
        if len(refs) == 0:
            raise ValueError("a reference set needs at least one image")
        adapted = None
        if self.heads is not None:
            adapted = self.heads.adapter(refs.embeds).mean(dim=0)
        return ReferenceSet(
            tokens_unit=normalize_reference_tokens(refs.tokens),
            embeds=refs.embeds,
            adapted_mean=adapted,
            k=len(refs),
            tokens_bf16=bf16_reference_rows(refs.tokens),
        )

    def forward(
        self, queries: ImageFeatures, refs: ReferenceSet, text_features: torch.Tensor
    ) -> ScoreComponents:
        """Score a batch of queries.

        queries:       tokens (batch, layers, patches, width), embeds (batch, embed_dim)
        refs:          the group's prepared references
        text_features: (2, embed_dim) normal/anomalous prompt embeddings of the category
        """
        patch_map = patch_anomaly_map(queries.tokens, refs.tokens_unit, refs.tokens_bf16)  # (B, P)
        fine = patch_map.amax(dim=-1)
        prior = text_prior(queries.embeds, text_features)
        if self.heads is None:
            nan = torch.full_like(fine, float("nan"))
            return ScoreComponents(fine, fine, nan, nan, prior, patch_map)
        if refs.adapted_mean is None:
            raise ValueError("this reference set was prepared by a scorer without heads; "
                             "prepare it with the scorer that scores")
        residual = image_residual(self.heads.adapter(queries.embeds), refs.adapted_mean)
        holistic_logits, image_logits = self.head_logits(patch_map, prior, residual)
        holistic, img_score = torch.sigmoid(holistic_logits), torch.sigmoid(image_logits)
        final = 0.5 * (holistic + fine)
        return ScoreComponents(final, fine, holistic, img_score, prior, patch_map)

    def head_logits(
        self, patch_map: torch.Tensor, prior: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-sigmoid outputs of the holistic and image-residual heads, each (batch,).

        patch_map: (batch, patches); prior: (batch,); residual: (batch, embed_dim). The
        holistic head reads the patch map plus the text prior plus the image-residual score
        broadcast over patches.
        """
        image_logits = self.heads.image_head.logits(residual)
        holistic_in = patch_map + prior.unsqueeze(1) + torch.sigmoid(image_logits).unsqueeze(1)
        return self.heads.holistic_head.logits(holistic_in), image_logits
