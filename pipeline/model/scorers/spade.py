"""SPADE (Cohen & Hoshen, 2020): kNN on the pooled deep feature, pyramid correspondences.

Image score: the mean Euclidean distance of the query's pooled deepest feature (WRN-50's
``avgpool``) to its K nearest references, K = min(k, 50) (the paper's K = 50).

Patch map: the gallery is the K nearest references (the same K). At every level of the
pyramid (strides 4, 8, 16: ResNet layers 1–3) each query position scores its distance to the
nearest feature (κ = 1) among all positions of all gallery images; the per-level maps are
upsampled (bilinear) to the finest grid and averaged, as the authors' reference code does.

Where few shots force a choice the paper did not face: K = 50 exceeds every few-shot k, so
the image score is the mean distance to all k references (at k = 1: the distance to the one)
and the gallery is every reference. A query equal to a reference therefore has a zero map,
but its image score is the mean over the other k − 1 distances and the zero, not 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.model.scorers.base import (Features, Models, ScorerEntry, ScorerOutput,
                                         batch_size)
from pipeline.model.scorers.cnn import CNN, POOLED, stage_key
from pipeline.model.scorers.knn import DEFAULT_CHUNK, chunked_knn, grouped_min_distance

SPADE_STRIDES = (4, 8, 16)
PAPER_K = 50


@dataclass
class SpadeMemory:
    """pooled: (k, C) the references' pooled features;
    levels:    stride → (k, h·w, C_s) their maps' positions, finest stride first;
    grids:     stride → (h, w)."""

    pooled: torch.Tensor
    levels: dict[int, torch.Tensor]
    grids: dict[int, tuple[int, int]]


class Spade:
    """SPADE on a CNN extractor's pooled feature and maps at ``strides``.

    build_memory(references) → SpadeMemory (k ≥ 1)
    score(queries, memory)   → score (B,) mean distance to the K nearest pooled references,
                               patch_map (B, h, w) on the finest grid,
                               components {"map_max": (B,) max of the map}

    Needs k ≥ 1; with k < K every reference is a neighbour (see the module docstring).
    """

    name = "spade"
    min_k = 1
    uses_pooled = True

    def __init__(self, strides: tuple[int, ...] = SPADE_STRIDES, top_k: int = PAPER_K,
                 chunk: int = DEFAULT_CHUNK) -> None:
        if not strides or top_k < 1:
            raise ValueError("SPADE needs strides and top_k ≥ 1")
        self.strides = tuple(sorted(strides))
        self.top_k = top_k
        self.chunk = chunk

    def build_memory(self, references: Features, context=None) -> SpadeMemory:
        k = batch_size(references)
        if k < self.min_k:
            raise ValueError(f"{self.name} needs at least {self.min_k} reference, got {k}")
        levels, grids = {}, {}
        for s in self.strides:
            m = references[stage_key(s)].float()
            levels[s] = m.flatten(2).transpose(1, 2).contiguous()  # (k, h·w, C)
            grids[s] = tuple(m.shape[-2:])
        return SpadeMemory(references[POOLED].float(), levels, grids)

    def score(self, queries: Features, memory: SpadeMemory) -> ScorerOutput:
        pooled = queries[POOLED].float()
        b = pooled.shape[0]
        kk = min(self.top_k, memory.pooled.shape[0])
        size = memory.grids[self.strides[0]]
        if b == 0:
            empty = pooled.new_zeros(0)
            return ScorerOutput(empty, pooled.new_zeros((0, *size)), {"map_max": empty})
        knn_dist, gallery = chunked_knn(pooled, memory.pooled, kk, self.chunk)  # (B, K)
        level_maps = []
        for s in self.strides:
            q = queries[stage_key(s)].float()
            if tuple(q.shape[-2:]) != memory.grids[s]:
                raise ValueError(f"queries' grid at stride {s} {tuple(q.shape[-2:])} is not "
                                 f"the memory's {memory.grids[s]}")
            h, w = memory.grids[s]
            per_ref = grouped_min_distance(q.flatten(2).transpose(1, 2).reshape(b * h * w, -1),
                                           memory.levels[s], self.chunk).view(b, h * w, -1)
            # keep each query's own gallery (its K nearest references), then the best of them
            in_gallery = per_ref.gather(2, gallery.unsqueeze(1).expand(b, h * w, kk))
            level = in_gallery.amin(dim=2).view(b, 1, h, w)
            if (h, w) != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            level_maps.append(level[:, 0])
        patch_map = torch.stack(level_maps).mean(dim=0)
        return ScorerOutput(knn_dist.mean(dim=1), patch_map,
                            {"map_max": patch_map.flatten(1).amax(1)})


class SpadeEntry(ScorerEntry):
    """SPADE on the CNN extractor: layers 1–3 and the pooled feature."""

    name = Spade.name
    extractor = CNN
    min_k = Spade.min_k

    def requirements(self, models: Models) -> Mapping[str, Any]:
        return {"strides": SPADE_STRIDES, "pooled": True}

    def build(self, models: Models) -> Spade:
        return Spade()


SPADE_ENTRY = SpadeEntry()
