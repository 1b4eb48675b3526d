"""The training forward: a batch of queries, each with its own few-shot reference set.

Scoring (``InCTRLModel.forward``) takes one reference set for a whole batch. In training every
query has its own freshly drawn prompts, yet the heads' BatchNorm layers must see the whole
batch at once (train mode normalises with batch statistics, and a batch of one is undefined).
So this module computes the per-query parts with the scorer's own pieces
(``prepare_references``, the residual functions) and runs the heads once over the batch. A test
checks that, when all queries share one reference set, it equals ``InCTRLModel.forward``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.model.backbone import ImageFeatures
from pipeline.model.inctrl import InCTRLModel, ReferenceSet
from pipeline.model.residual import image_residual, patch_anomaly_map, text_prior


@dataclass
class EpisodeOutputs:
    """Per-query outputs of the training forward; each tensor is (batch,).

    holistic_logits / image_logits are the heads' pre-sigmoid values; ``final`` is the
    reported score (σ(holistic) + fine) / 2 and ``fine`` the (untrainable) patch residual.
    """

    holistic_logits: torch.Tensor
    image_logits: torch.Tensor
    fine: torch.Tensor

    @property
    def holistic(self) -> torch.Tensor:
        return torch.sigmoid(self.holistic_logits)

    @property
    def image_residual(self) -> torch.Tensor:
        return torch.sigmoid(self.image_logits)

    @property
    def final(self) -> torch.Tensor:
        return 0.5 * (self.holistic + self.fine)


def prepare_episode_references(scorer: InCTRLModel,
                               references: Sequence[ImageFeatures]) -> list[ReferenceSet]:
    """One prepared reference set per query (the adapter runs with gradients)."""
    return [scorer.prepare_references(refs) for refs in references]


def forward_episodes(scorer: InCTRLModel, queries: ImageFeatures, refs: Sequence[ReferenceSet],
                     text_features: torch.Tensor) -> EpisodeOutputs:
    """Score each query against its own references, with the heads over the whole batch.

    queries:       tokens (batch, layers, patches, width), embeds (batch, embed_dim)
    refs:          batch prepared reference sets, one per query
    text_features: (batch, 2, embed_dim) each query's category prompt embeddings
    """
    heads = scorer.heads
    if heads is None:
        raise ValueError("training needs a scorer with heads")
    batch = len(queries)
    if len(refs) != batch or text_features.shape[0] != batch:
        raise ValueError(f"{batch} queries need {batch} reference sets and text features, got "
                         f"{len(refs)} and {text_features.shape[0]}")
    adapted = heads.adapter(queries.embeds)  # (B, D)
    patch_maps, priors, residuals = [], [], []
    for i, ref in enumerate(refs):
        q = queries[i]
        patch_maps.append(patch_anomaly_map(q.tokens, ref.tokens_unit))  # (1, P)
        priors.append(text_prior(q.embeds, text_features[i]))  # (1,)
        residuals.append(image_residual(adapted[i:i + 1], ref.adapted_mean))  # (1, D)
    patch_map = torch.cat(patch_maps)
    holistic_logits, image_logits = scorer.head_logits(
        patch_map, torch.cat(priors), torch.cat(residuals))
    return EpisodeOutputs(holistic_logits=holistic_logits, image_logits=image_logits,
                          fine=patch_map.amax(dim=-1))
