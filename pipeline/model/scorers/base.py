"""The seam every comparison scorer and feature extractor implements (pure torch).

Features travel as ``Features``: a dict of tensors that all have the batch first, so the job
can batch, move, cache and stack them without knowing what they are. An extractor turns
preprocessed pixels into Features once per image; several scorers may read the same
extractor's Features (one forward per backbone). A scorer builds a normal memory from the k
references of a group once, then scores query batches against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch

#: name → (batch, ...) tensor; every value has the same batch size.
Features = Mapping[str, torch.Tensor]


def batch_size(features: Features) -> int:
    sizes = {v.shape[0] for v in features.values()}
    if len(sizes) != 1:
        raise ValueError(f"features disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def cat_features(items: list[Features]) -> dict[str, torch.Tensor]:
    """Stack per-image (or per-batch) Features along the batch."""
    if not items:
        raise ValueError("nothing to concatenate")
    return {key: torch.cat([f[key] for f in items]) for key in items[0]}


@dataclass
class ScorerOutput:
    """What a scorer says about a batch of B queries.

    score:      (B,) image anomaly score, larger = more anomalous
    patch_map:  (B, h, w) anomaly map on the scorer's feature grid (upsampled later), or
                None where the scorer has none (InCTRL zero-shot)
    components: name → (B,) further scores worth reporting (may be empty)
    """

    score: torch.Tensor
    patch_map: torch.Tensor | None
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class FeatureExtractor(Protocol):
    """Turns preprocessed images into Features; loaded once per worker, frozen."""

    #: everything the features depend on (architecture, weights, layers, input size)
    identity: str

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """PIL image (RGB) → (3, H, W) float tensor, the extractor's own transform."""

    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → Features on the extractor's device."""


class Scorer(Protocol):
    """A training-free few-shot anomaly scorer."""

    #: short name written to every output row (``patchcore``)
    name: str
    #: the smallest k it works with (0: it can score zero-shot)
    min_k: int

    def build_memory(self, references: Features, context: Mapping[str, Any] | None = None) -> Any:
        """The normal memory of one group from its k references (k = batch of ``references``),
        built once per (dataset, category, seed). ``context`` carries per-category inputs
        some scorers need (text embeddings of the category's prompts)."""

    def score(self, queries: Features, memory: Any) -> ScorerOutput:
        """Score a batch of queries against a memory from ``build_memory``."""
