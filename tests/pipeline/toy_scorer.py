"""A scorer added the way any new one is: this module and one ``registry.register`` call.

"meanref": a query's cosine distance to the mean of its references' CLIP image embeddings,
raised to ``--meanref-power``. Nothing else in the project knows it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.model.scorers.base import Features, Models, Option, ScorerEntry, ScorerOutput


class MeanReference:
    def __init__(self, power: float) -> None:
        self.power = power

    def build_memory(self, references: Features, context: Mapping[str, Any] | None = None
                     ) -> torch.Tensor:
        return F.normalize(references["embeds"].float().mean(dim=0), dim=-1)

    def score(self, queries: Features, memory: torch.Tensor) -> ScorerOutput:
        cos = F.normalize(queries["embeds"].float(), dim=-1) @ memory
        return ScorerOutput(score=(1.0 - cos).clamp_min(0) ** self.power, patch_map=None)


class MeanReferenceEntry(ScorerEntry):
    name = "meanref"
    extractor = "clip"
    min_k = 1
    options = (Option("meanref_power", 1.0, "meanref: power of the distance", type=float),)

    def build(self, models: Models) -> MeanReference:
        return MeanReference(models.setting("meanref_power"))


ENTRY = MeanReferenceEntry()
