"""PatchCore (Roth et al., 2022): a memory bank of locally aware patch features.

Patch features: each of two mid-level maps (strides 8 and 16, WRN-50's layer2 and layer3) is
averaged over the 3×3 neighbourhood of every position (borders average the neighbours that
exist), the coarser is upsampled (bilinear) to the finer grid, each is average-pooled along
channels to ``pretrain_dim`` (so both stages weigh the same), and the concatenation is
average-pooled to ``target_dim`` (the paper's 1024 and 1024).

Memory: every patch of the k references; optionally a greedy k-center coreset of
``coreset_ratio`` of them, chosen in a seeded random projection to ``projection_dim``
dimensions (the paper's Johnson–Lindenstrauss speed-up).

Score: a patch scores the distance to its nearest memory patch; the image scores the largest
patch score s* = ‖m_q − m*‖ (m_q the query patch, m* its nearest memory patch), reweighted as
in the paper's eq. 7:

    s = (1 − exp‖m_q − m*‖ / Σ_{m ∈ N_b(m*)} exp‖m_q − m‖) · s*,

N_b(m*) the b nearest memory patches of m* (m* itself among them). The weight lies in
[1 − 1/b, 1): it lowers the score when m*'s neighbourhood is as close to m_q as m* is.

Where few shots force a choice the paper did not face:
- the coreset is off by default: k references give a bank of only k·h·w patches, far below
  the sizes the paper subsamples (1–10 % of ~10⁵–10⁶ patches);
- with so small a bank, N_b(m*) is mostly m*'s spatial neighbours in its own reference image;
- b is capped by the bank size, and a bank of one patch (b = 1 would make the weight 0 and
  every score 0) is scored without the reweighting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.model.scorers.base import Features, ScorerOutput, batch_size
from pipeline.model.scorers.cnn import stage_key
from pipeline.model.scorers.knn import DEFAULT_CHUNK, chunked_knn, chunked_min_distance

PATCHCORE_STRIDES = (8, 16)
PRETRAIN_DIM = 1024
TARGET_DIM = 1024
PROJECTION_DIM = 128
NEIGHBOURS = 9  # b of eq. 7


@dataclass
class PatchCoreMemory:
    """bank: (M, D) memory patches; grid: the (h, w) patch grid of a query."""

    bank: torch.Tensor
    grid: tuple[int, int]


def random_projection(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """x (N, D) → (N, dim) by a seeded Gaussian matrix scaled by 1/√dim; x itself if D ≤ dim."""
    if x.shape[1] <= dim:
        return x
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(x.shape[1], dim, generator=gen).to(x.device, x.dtype) / dim**0.5
    return x @ proj


def greedy_coreset(z: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Greedy k-center selection: from ``start``, add the point farthest from those chosen.

    z: (N, D) (projected) features, 1 ≤ n ≤ N → (n,) indices, in the order chosen.
    One (N,) distance update per chosen point: O(N·n·D) time, O(N) extra memory.
    """
    count = z.shape[0]
    if not 1 <= n <= count:
        raise ValueError(f"coreset size must be in [1, {count}], got {n}")
    chosen = torch.empty(n, dtype=torch.long, device=z.device)
    chosen[0] = start
    nearest = (z - z[start]).norm(dim=1)  # (N,) distance to the chosen set
    for i in range(1, n):
        pick = int(nearest.argmax())
        chosen[i] = pick
        nearest = torch.minimum(nearest, (z - z[pick]).norm(dim=1))
    return chosen


class PatchCore:
    """PatchCore on a CNN extractor's maps at two ``strides`` (Features ``s8``, ``s16``).

    build_memory(references) → PatchCoreMemory (k ≥ 1)
    score(queries, memory)   → score (B,) reweighted max patch score, patch_map (B, h, w)
                               nearest-memory distances on the finer grid, components
                               {"max_patch": (B,) s*, "reweight": (B,) the eq. 7 weight}

    Needs k ≥ 1; the few-shot choices (no coreset, capped b) are in the module docstring.
    """

    name = "patchcore"
    min_k = 1
    uses_pooled = False

    def __init__(self, strides: tuple[int, ...] = PATCHCORE_STRIDES,
                 pretrain_dim: int = PRETRAIN_DIM, target_dim: int = TARGET_DIM,
                 coreset_ratio: float | None = None, projection_dim: int = PROJECTION_DIM,
                 neighbours: int = NEIGHBOURS, seed: int = 0, chunk: int = DEFAULT_CHUNK) -> None:
        if not strides or min(pretrain_dim, target_dim, projection_dim, neighbours) < 1:
            raise ValueError("PatchCore needs strides and positive dimensions / neighbours")
        if coreset_ratio is not None and not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.strides = tuple(sorted(strides))
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.neighbours = neighbours
        self.seed = seed
        self.chunk = chunk

    def embed(self, features: Features) -> torch.Tensor:
        """Locally aware patch features: (B, h, w, target_dim) on the finest stage's grid."""
        maps = [F.avg_pool2d(features[stage_key(s)].float(), 3, stride=1, padding=1,
                             count_include_pad=False) for s in self.strides]
        size = maps[0].shape[-2:]
        parts = []
        for m in maps:
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            b, c, h, w = m.shape
            per_patch = m.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
            parts.append(F.adaptive_avg_pool1d(per_patch, self.pretrain_dim))
        emb = F.adaptive_avg_pool1d(torch.cat(parts, dim=2), self.target_dim)
        return emb.view(b, h, w, self.target_dim)

    def build_memory(self, references: Features, context=None) -> PatchCoreMemory:
        k = batch_size(references)
        if k < self.min_k:
            raise ValueError(f"{self.name} needs at least {self.min_k} reference, got {k}")
        emb = self.embed(references)
        bank = emb.reshape(-1, emb.shape[-1])
        if self.coreset_ratio is not None and self.coreset_ratio < 1:
            n = max(1, round(self.coreset_ratio * bank.shape[0]))
            start = int(torch.randint(bank.shape[0], (1,),
                                      generator=torch.Generator().manual_seed(self.seed)))
            z = random_projection(bank, self.projection_dim, self.seed)
            bank = bank[greedy_coreset(z, n, start)]
        return PatchCoreMemory(bank, tuple(emb.shape[1:3]))

    def score(self, queries: Features, memory: PatchCoreMemory) -> ScorerOutput:
        emb = self.embed(queries)
        b, h, w, d = emb.shape
        if (h, w) != memory.grid:
            raise ValueError(f"queries' grid {(h, w)} is not the memory's {memory.grid}")
        patches = emb.reshape(b, h * w, d)
        dist, nn = chunked_min_distance(patches.reshape(-1, d), memory.bank, self.chunk)
        dist, nn = dist.view(b, h * w), nn.view(b, h * w)
        if b == 0:
            empty = dist.new_zeros(0)
            return ScorerOutput(empty, dist.view(0, h, w), {"max_patch": empty, "reweight": empty})
        top = dist.argmax(dim=1)  # (B,) the most anomalous patch
        rows = torch.arange(b, device=dist.device)
        s_star = dist[rows, top]
        m_query = patches[rows, top]  # (B, D)
        m_star = memory.bank[nn[rows, top]]  # (B, D)
        nb = min(self.neighbours, memory.bank.shape[0])
        if nb >= 2:
            _, support = chunked_knn(m_star, memory.bank, nb, self.chunk)  # (B, b), m* included
            to_support = (m_query.unsqueeze(1) - memory.bank[support]).norm(dim=-1)  # (B, b)
            weight = 1 - torch.exp(s_star - torch.logsumexp(to_support, dim=1))
        else:
            weight = torch.ones_like(s_star)
        return ScorerOutput(weight * s_star, dist.view(b, h, w),
                            {"max_patch": s_star, "reweight": weight})
