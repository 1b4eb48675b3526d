"""The seeded few-shot draw: which k normal references a seed gives a (dataset, category) group.

Each candidate is ranked by a hash of (seed, dataset, category, image_id) and the k smallest
ranks are drawn: the same draw on any runner, any number of workers and any input order.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from pipeline.core.manifest import ManifestRow


def sampler_rank(seed: int, dataset: str, category: str, image_id: str) -> str:
    """Position of a candidate in the seeded draw; smaller ranks are drawn first."""
    return hashlib.sha256(f"{seed}\x1f{dataset}\x1f{category}\x1f{image_id}".encode()).hexdigest()


def draw_references(candidates: Sequence[ManifestRow], seed: int, k: int) -> list[ManifestRow]:
    """The k references a seed draws from one group's candidates (pure reference version)."""
    ranked = sorted(candidates, key=lambda r: sampler_rank(seed, r.dataset, r.category, r.image_id))
    return ranked[:k]
