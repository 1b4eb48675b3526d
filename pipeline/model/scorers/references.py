"""Choosing a group's k normal references from a pool of candidates, in a scorer's own
feature space (pure torch).

``random`` is the seeded hash draw (``pipeline.core.sampling``); ``representative`` is
k-medoids on the cosine distance of one descriptor per image:

- the descriptor of an extractor's Features (``descriptors``, its entry's ``descriptor``):
  CLIP's image embedding (InCTRL and WinCLIP), the CNN's pooled deepest map (SPADE, PaDiM
  and PatchCore share it; the run always extracts it when it selects references), DINO's
  mean patch token (AnomalyDINO); L2-normalised;
- k-medoids (``k_medoids``): the k pool images minimising the sum, over the pool, of each
  image's distance to its nearest chosen one. Greedy BUILD (the first medoid is the most
  central image, each next one the largest drop in that sum) then SWAP (the best
  improving exchange of a medoid for a non-medoid, until none improves). Costs within a
  relative 1e-6 are ties and go to the lower pool index, and the job puts a pool in one
  order (by image id), so the same pool gives the same k on any runner, for any seed and
  in any input order (whose batches change features in their last bits).

Why k-medoids and not greedy k-center (farthest-first): k-center covers the pool's worst
case, so it picks outliers first (a slightly odd normal image becomes a reference and hides
similar defects); k-medoids minimises the average distance, so it picks typical images and
still gives a sizeable far cluster its own reference (bench/references.py compares the two).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from pipeline.model.scorers.registry import extractor_entry

RANDOM, REPRESENTATIVE = "random", "representative"
SELECTIONS = (RANDOM, REPRESENTATIVE)
_MAX_SWAPS = 100
# Costs closer than this (relative) are ties: features of the same image differ in their
# last bits between runners (batch composition), and that must not change the choice.
_TIE = 1e-6


def descriptors(extractor: str, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One L2-normalised descriptor per image, (n, d), from an extractor's Features (its
    entry's ``descriptor``: CLIP's image embedding, the CNN's pooled deepest map, DINO's
    mean patch token, ...)."""
    x = extractor_entry(extractor).descriptor(features)
    return F.normalize(x.float().flatten(1), dim=-1)


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """(n, d) unit rows → (n, n) cosine distances 1 − cos, clamped at 0, exact 0 diagonal."""
    d = (1.0 - x @ x.T).clamp_min(0.0)
    return d.fill_diagonal_(0.0)


def first_min(values: torch.Tensor) -> int:
    """Index of the smallest value; values within ``_TIE`` (relative) of it are ties, which
    go to the lowest index."""
    best = values.min()
    tol = _TIE * max(1.0, abs(float(best))) if torch.isfinite(best) else 0.0
    return int(torch.nonzero(values <= best + tol)[0, 0])


def k_medoids(dist: torch.Tensor, k: int) -> torch.Tensor:
    """k medoid indices (in the order chosen) of an (n, n) distance matrix; all n when
    k ≥ n. Greedy BUILD, then best-improvement SWAP until no exchange lowers the cost."""
    n = dist.shape[0]
    if k >= n:
        return torch.arange(n)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    medoids = [first_min(dist.sum(dim=1))]
    nearest = dist[medoids[0]].clone()  # (n,) distance of each image to its nearest medoid
    while len(medoids) < k:
        cost = torch.minimum(nearest.unsqueeze(0), dist).sum(dim=1)  # (n,) adding each one
        cost[medoids] = float("inf")
        c = first_min(cost)
        medoids.append(c)
        nearest = torch.minimum(nearest, dist[c])
    current = nearest.sum()
    for _ in range(_MAX_SWAPS):
        best = (current, -1, -1)
        chosen = torch.tensor(medoids)
        for slot in range(k):
            others = torch.cat([chosen[:slot], chosen[slot + 1:]])
            rest = dist[others].min(dim=0).values if len(others) else torch.full(
                (n,), float("inf"))
            cost = torch.minimum(rest.unsqueeze(0), dist).sum(dim=1)  # (n,) swapping in each
            cost[chosen] = float("inf")
            c = first_min(cost)
            # better by more than a tie: no swaps between equals, the same on any runner
            if cost[c] < best[0] - _TIE * max(1.0, float(best[0])):
                best = (cost[c], slot, c)
        if best[1] < 0:
            break
        medoids[best[1]] = best[2]
        current = best[0]
    return torch.tensor(medoids)


def choose_representative(extractor: str, features: Mapping[str, torch.Tensor],
                          k: int) -> torch.Tensor:
    """Indices into the pool (its batch order) of the k references k-medoids chooses in the
    extractor's descriptor space; the whole pool, in order, when it has at most k."""
    x = descriptors(extractor, features)
    return k_medoids(cosine_distances(x.cpu().double()), k)
