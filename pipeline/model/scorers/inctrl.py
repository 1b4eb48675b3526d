"""InCTRL (Zhu & Pang, CVPR 2024) behind the scorer seam: ``pipeline.model.inctrl``'s model
on the CLIP extractor's tokens and embedding, with the category's prompt pair.

With k ≥ 1 exactly ``InCTRLModel``'s forward (the final score with heads, the fine patch
residual without); with k = 0 the text prior alone (zero-shot), which has no patch map.
Its rows keep the model id the job has always written:
``<backbone>@<weights>|blocks=...|heads=<sha256 prefix or none>``, with
``|precision=<bf16 or tf32>`` added for a run in another precision than fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from pipeline.model.backbone import ImageFeatures, describe
from pipeline.model.inctrl import InCTRLModel, ReferenceSet
from pipeline.model.loading import get_model, model_id
from pipeline.model.residual import text_prior
from pipeline.model.scorers.base import (TEXT, WITH_HEADS, Features, Models, ScorerEntry,
                                         ScorerOutput, TRAINING_FREE, ZERO_SHOT)
from pipeline.model.scorers.clip import CLIP, EMBEDS, TOKENS

INCTRL = "inctrl"
#: InCTRL's components, as the scores table names them (without ``_score``).
INCTRL_COMPONENTS = ("fine", "holistic", "image_residual", "text_prior")


@dataclass
class InctrlMemory:
    """A group's InCTRL state: its prepared references (None at k = 0) and text features."""

    refs: ReferenceSet | None
    text: torch.Tensor  # (2, embed_dim)


class InctrlScorer:
    """InCTRL on the CLIP extractor's Features: build_memory(references, {TEXT: (2, D)}),
    score(queries, memory) → final score, patch map (grid), and its four components."""

    def __init__(self, model: InCTRLModel, grid: tuple[int, int]) -> None:
        self.model = model
        self.grid = grid

    @property
    def has_heads(self) -> bool:
        return self.model.has_heads

    def build_memory(self, references: Features,
                     context: Mapping[str, Any] | None = None) -> InctrlMemory:
        if not context or TEXT not in context:
            raise ValueError(f"inctrl needs the category's prompt embeddings as "
                             f"context[{TEXT!r}]")
        refs = None
        if references and references[TOKENS].shape[0] > 0:
            refs = self.model.prepare_references(
                ImageFeatures(references[TOKENS], references[EMBEDS]))
        return InctrlMemory(refs, context[TEXT])

    def score(self, queries: Features, memory: InctrlMemory) -> ScorerOutput:
        feats = ImageFeatures(queries[TOKENS], queries[EMBEDS])
        if memory.refs is None:
            prior = text_prior(feats.embeds, memory.text)
            nan = torch.full_like(prior, float("nan"))
            return ScorerOutput(score=prior, patch_map=None, components={
                "fine": nan, "holistic": nan, "image_residual": nan, "text_prior": prior})
        comps = self.model(feats, memory.refs, memory.text)
        return ScorerOutput(
            score=comps.final, patch_map=comps.patch_map.view(-1, *self.grid),
            components={name: getattr(comps, name) for name in INCTRL_COMPONENTS})


class InctrlEntry(ScorerEntry):
    """InCTRL: ``--checkpoint`` (the heads; training-free without), the text prior at k = 0."""

    name = INCTRL
    extractor = CLIP
    min_k = 0
    needs_text = True
    trainable = True
    components = INCTRL_COMPONENTS

    def build(self, models: Models) -> InctrlScorer:
        model, _ = get_model(models.clip, models.checkpoint)
        return InctrlScorer(model, describe(models.clip).geometry.grid)

    def checkpoint(self, models: Models) -> str | None:
        return models.checkpoint

    def mode(self, models: Models, k: int) -> str:
        if k == 0:
            return ZERO_SHOT
        return WITH_HEADS if models.checkpoint else TRAINING_FREE

    def identity(self, models: Models, extractor_identity: str, checkpoint_hash: str | None
                 ) -> str:
        return model_id(models.clip, checkpoint_hash or "none")


INCTRL_ENTRY = InctrlEntry()
