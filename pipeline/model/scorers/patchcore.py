"""PatchCore (Roth et al., CVPR 2022), as the paper describes it and its authors' code
computes it (amazon-science/patchcore-inspection: ``PatchMaker``, ``Preprocessing``/
``MeanMapper``, ``Aggregator``, ``NearestNeighbourScorer``).

Patch features: two mid-level maps (strides 8 and 16: WRN-50's layer2 and layer3) are each
aggregated over the 3×3 neighbourhood of every position, the map zero-padded by one at its
border (the official unfold's padding); each position's vector is average-pooled
(``adaptive_avg_pool1d``) to ``pretrain_dim``; the coarser layer is bilinearly resized
(``align_corners=False``) to the finer grid; the layers' vectors are concatenated in stride
order and pooled again to ``target_dim`` (the official 1024 and 1024). The neighbourhood
aggregation (``aggregation``):

- ``mean`` (default): the paper's "local smoothing over each individual feature map": the
  3×3 mean of each channel, the padding's zeros counted, then the channels pooled.
- ``official``: the official code's chain: each 3×3 patch flattened channel first (index
  c·9 + 3·ky + kx) and that C·9 vector pooled. On WRN-50's 1024-channel layer3 this is the
  same 3×3 mean; on its 512-channel layer2 a centre-weighted one (0.2 centre, 0.1 around);
  on narrow layers (a MobileNetV2's 32 channels: 288 < 1024 values) the pooling repeats or
  pairs neighbouring values, so the 3×3×C neighbourhood is kept unsmoothed. Measured on
  MobileNetV2 with real weights it loses 0.03–0.05 image AUROC (0.13–0.15 on magnified
  regions) against ``mean`` (bench/RESULTS.md), hence not the default.

Stage weights (``stage_dims``):

- ``pooled`` (default, the reference): each stage pooled to ``pretrain_dim`` and the
  concatenation to ``target_dim``, as the official ``Preprocessing``/``MeanMapper`` and
  ``Aggregator`` do whatever a layer's width (its registry lists narrow backbones such as
  MNASNet and EfficientNet with the same 1024/1024 chain). Every stage so gets the same
  number of values: a narrower stage has its channels repeated, a wider one averaged in
  groups. On MobileNetV2 (32 and 96 channels) each stage holds half of the squared
  distance and a stride-8 channel counts three times a stride-16 one; on WRN-50 layer2's
  512 channels stay single and layer3's 1024 are averaged in pairs.
- ``concat``: no channel pooling: the stages' aggregated channels concatenated as they are
  (``sum(C)`` dimensions, the paper's concatenation of the levels), so a stage weighs by
  its channel count (on MobileNetV2 128 dimensions instead of 1024). Measured on
  MobileNetV2 (``bench.patchcore_gap``, bench/RESULTS.md) it equals the ``bench.patch_knn``
  yardstick: about +0.015 on displaced and rotated regions of the same texture (the
  stride-16 stage weighs more) and about as much less on scaled ones (the stride-8 stage
  weighs less), the same on the mean of the kinds; an option, not the default.

Memory: every patch of the k references; optionally a greedy k-center coreset of
``coreset_ratio`` of them, chosen in a seeded random projection to ``projection_dim``
dimensions (the paper's Johnson–Lindenstrauss speed-up). The official code runs an
approximate greedy coreset of 10 % (its 224 px baseline); with k references the bank holds
only k·28·28 patches, so the coreset is off by default here (measured in bench/RESULTS.md).

Score: a patch scores the *squared* Euclidean distance to its nearest memory patch (FAISS'
``IndexFlatL2`` returns squared distances and the official code keeps them); the image
scores the largest patch score, the plain maximum (the official code has no reweighting:
the paper's Eq. 7 is not in it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.model.scorers.base import (Features, Models, Option, ScorerEntry, ScorerOutput,
                                         batch_size, unit_fraction)
from pipeline.model.scorers.cnn import CNN, stage_key
from pipeline.model.scorers.knn import DEFAULT_CHUNK, chunked_min_distance

PATCHCORE_STRIDES = (8, 16)
PRETRAIN_DIM = 1024
TARGET_DIM = 1024
PROJECTION_DIM = 128
PATCH_SIZE = 3
MEAN, OFFICIAL = "mean", "official"
AGGREGATIONS = (MEAN, OFFICIAL)
POOLED, CONCAT = "pooled", "concat"
STAGE_DIMS = (POOLED, CONCAT)
# Bound one unfolded block (images × C·9 × positions) to about this many elements.
_MAX_UNFOLDED = 1 << 24


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


def local_means(feature_map: torch.Tensor, dim: int) -> torch.Tensor:
    """Each channel's 3×3 neighbourhood mean (zeros outside the map counted), then each
    position's C channels average-pooled to ``dim`` values.

    feature_map: (B, C, h, w) → (B, dim, h, w)
    """
    b, c, h, w = feature_map.shape
    smooth = F.avg_pool2d(feature_map, PATCH_SIZE, stride=1, padding=PATCH_SIZE // 2,
                          count_include_pad=True)
    flat = smooth.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).view(b, h, w, dim).permute(0, 3, 1, 2)


def patch_vectors(feature_map: torch.Tensor, dim: int) -> torch.Tensor:
    """Each position's zero-padded 3×3 patch, flattened channel first and average-pooled to
    ``dim`` values (``PatchMaker.patchify`` then ``MeanMapper``).

    feature_map: (B, C, h, w) → (B, dim, h, w)
    """
    b, c, h, w = feature_map.shape
    per_image = max(1, c * PATCH_SIZE**2 * h * w)
    step = max(1, _MAX_UNFOLDED // per_image)
    out = []
    for start in range(0, b, step):
        part = feature_map[start:start + step]
        n = part.shape[0]
        patches = F.unfold(part, PATCH_SIZE, padding=PATCH_SIZE // 2)  # (n, C·9, h·w)
        flat = patches.transpose(1, 2).reshape(n * h * w, 1, c * PATCH_SIZE**2)
        pooled = F.adaptive_avg_pool1d(flat, dim).view(n, h, w, dim)
        out.append(pooled.permute(0, 3, 1, 2))
    if not out:
        return feature_map.new_zeros((0, dim, h, w))
    return torch.cat(out)


class PatchCore:
    """PatchCore on a CNN extractor's maps at two ``strides`` (Features ``s8``, ``s16``).

    build_memory(references) → PatchCoreMemory (k ≥ 1)
    score(queries, memory)   → score (B,) the largest patch score, patch_map (B, h, w) the
                               squared distance of each patch to its nearest memory patch, on
                               the finer grid

    Needs k ≥ 1; the coreset is off by default and ``aggregation`` is the paper's local
    mean unless asked otherwise (see the module docstring).
    """

    name = "patchcore"
    min_k = 1
    uses_pooled = False

    def __init__(self, strides: tuple[int, ...] = PATCHCORE_STRIDES,
                 pretrain_dim: int = PRETRAIN_DIM, target_dim: int = TARGET_DIM,
                 coreset_ratio: float | None = None, projection_dim: int = PROJECTION_DIM,
                 seed: int = 0, chunk: int = DEFAULT_CHUNK, aggregation: str = MEAN,
                 stage_dims: str = POOLED) -> None:
        if not strides or min(pretrain_dim, target_dim, projection_dim) < 1:
            raise ValueError("PatchCore needs strides and positive dimensions")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if stage_dims not in STAGE_DIMS:
            raise ValueError(f"stage_dims must be one of {STAGE_DIMS}, got {stage_dims!r}")
        if coreset_ratio is not None and not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.strides = tuple(sorted(strides))
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.chunk = chunk
        self.aggregation = aggregation
        self.stage_dims = stage_dims

    def embed(self, features: Features) -> torch.Tensor:
        """Locally aware patch features on the finest stage's grid: (B, h, w, target_dim);
        with ``stage_dims`` ``concat`` (B, h, w, D), D the stages' aggregated widths summed
        (C, or C·9 for the ``official`` aggregation)."""
        parts: list[torch.Tensor] = []
        aggregate = local_means if self.aggregation == MEAN else patch_vectors
        for s in self.strides:
            feature_map = features[stage_key(s)].float()
            # concat keeps each stage's own width: pool to the width it already has
            dim = (self.pretrain_dim if self.stage_dims == POOLED else
                   feature_map.shape[1] * (1 if self.aggregation == MEAN else PATCH_SIZE**2))
            layer = aggregate(feature_map, dim)
            if parts and layer.shape[-2:] != parts[0].shape[-2:]:
                layer = F.interpolate(layer, size=parts[0].shape[-2:], mode="bilinear",
                                      align_corners=False)
            parts.append(layer)
        joined = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.stage_dims == CONCAT:
            return joined
        b, h, w, d = joined.shape
        pooled = F.adaptive_avg_pool1d(joined.reshape(b * h * w, 1, d), self.target_dim)
        return pooled.view(b, h, w, self.target_dim)

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
        dist, _ = chunked_min_distance(emb.reshape(-1, d), memory.bank, self.chunk)
        patch_map = dist.square().view(b, h, w)
        return ScorerOutput(patch_map.flatten(1).amax(1) if b else patch_map.new_zeros(0),
                            patch_map)


class PatchCoreEntry(ScorerEntry):
    """PatchCore on the CNN extractor's strides 8 and 16."""

    name = PatchCore.name
    extractor = CNN
    min_k = PatchCore.min_k
    options = (
        Option("patchcore_aggregation", MEAN,
               "patchcore: 3×3 neighbourhood aggregation: 'mean' (the paper's local smoothing "
               "of each channel; default) or 'official' (the authors' code: each flattened "
               "C×3×3 patch pooled; the same on WRN-50's layer3, unsmoothed on narrow layers)",
               choices=AGGREGATIONS),
        Option("patchcore_stage_dims", POOLED,
               "patchcore: 'pooled' (the authors' code: each stage pooled to 1024, then "
               "together to 1024, so every stage weighs the same; default) or 'concat' (the "
               "stages' channels concatenated unpooled, each stage weighing by its width)",
               choices=STAGE_DIMS),
        Option("coreset_ratio", None,
               "patchcore: keep this fraction of the reference patches (greedy coreset; "
               "default: all, as suits few shots)", type=unit_fraction),
    )

    def requirements(self, models: Models) -> Mapping[str, Any]:
        return {"strides": PATCHCORE_STRIDES}

    def build(self, models: Models) -> PatchCore:
        return PatchCore(coreset_ratio=models.setting("coreset_ratio"),
                         aggregation=models.setting("patchcore_aggregation"),
                         stage_dims=models.setting("patchcore_stage_dims"))


PATCHCORE_ENTRY = PatchCoreEntry()
