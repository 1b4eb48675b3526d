"""PaDiM (Defard et al., 2020): a Gaussian per feature-map position, Mahalanobis distance.

No code from the authors exists; this follows the paper, with anomalib's implementation
and the widely used unofficial one (xiahaifeng1995/PaDiM-Anomaly-Detection-Localization) as
cross-checks where the paper is silent.

Embedding: the maps of strides 4, 8 and 16 (ResNet layers 1–3), the coarser upsampled to the
finest grid (nearest, as the paper's patch-wise concatenation), concatenated, and a seeded
random subset of ``n_features`` channels kept (the paper: 100 of 448 for ResNet-18, 550 of
1792 for WRN-50, ``paper_features``; capped by the total). At every position p the k
references give samples x_1..x_k ∈ R^d of a Gaussian N(μ_p, Σ_p); a query's map is the
Mahalanobis distance √((x − μ_p)ᵀ Σ_p⁻¹ (x − μ_p)); its image score is the maximum of that map
after bilinear upsampling to the input's pixels and a Gaussian blur of σ = 4 pixels.

Covariance (``covariance``):
- ``sample`` (default, the references'): the unbiased sample covariance plus the paper's
  regulariser, Σ = XᵀX/(k − 1) + 0.01·I (X the centred samples). At k = 1 the references
  divide by zero (NaN); here X = 0 and Σ = 0.01·I: the map is 10 × the Euclidean distance to
  the one reference.
- ``ledoit-wolf``: with S = XᵀX/k the Ledoit–Wolf (2004) estimate per position, in closed
  form, shrinking S towards μI:

    μ = tr(S)/d,  δ² = ‖S − μI‖²_F/d,  β² = min(δ², (1/k²) Σ_i ‖x_i x_iᵀ − S‖²_F / d),
    ρ = β²/δ² (0 when δ² = 0),         Σ = (1 − ρ)S + ρμI + 0.01·I.

  With k ≪ d the sample covariance has rank ≤ k − 1, so 0.01·I alone decides almost every
  direction; the shrinkage puts the references' own scale there instead (measured against
  ``sample`` in bench/RESULTS.md).

Either way Σ is εI-like plus a rank-k term, so it is never formed: its inverse follows from
the k×k Gram matrix of the samples (Woodbury), and memory and time stay O(positions · k · d)
instead of O(positions · d²).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.model.maps import gaussian_blur
from pipeline.model.scorers.base import (Features, Models, Option, ScorerEntry, ScorerOutput,
                                         batch_size)
from pipeline.model.scorers.cnn import CNN, stage_key


def paper_features(backbone: str) -> int:
    """The channels PaDiM keeps on ``backbone``: the paper's d where it names one."""
    return PAPER_FEATURES.get(backbone, DEFAULT_N_FEATURES)

PADIM_STRIDES = (4, 8, 16)
DEFAULT_N_FEATURES = 550  # the paper's d for WRN-50, kept for backbones it does not name
#: The paper's d per backbone (of 448 and 1792 channels).
PAPER_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
EPSILON = 0.01  # the paper's regulariser
SIGMA = 4.0  # Gaussian blur of the map, in input pixels
SAMPLE, LEDOIT_WOLF = "sample", "ledoit-wolf"
COVARIANCES = (SAMPLE, LEDOIT_WOLF)
# Bound a (queries, positions, d) residual block to about this many elements.
_MAX_ELEMENTS = 1 << 24


@dataclass
class LedoitWolf:
    """Per-position Ledoit–Wolf estimate of P Gaussians from k samples of width d.

    mean:     (P, d)
    centered: (P, k, d) samples minus their mean
    rho:      (P,) shrinkage intensity ρ ∈ [0, 1]
    mu:       (P,) target scale μ = tr(S)/d
    """

    mean: torch.Tensor
    centered: torch.Tensor
    rho: torch.Tensor
    mu: torch.Tensor

    def covariance(self, epsilon: float = 0.0) -> torch.Tensor:
        """(P, d, d) = (1 − ρ)S + ρμI + εI, formed explicitly (small d only: tests, debugging)."""
        k, d = self.centered.shape[1:]
        s = self.centered.transpose(1, 2) @ self.centered / k
        eye = torch.eye(d, dtype=s.dtype, device=s.device)
        return ((1 - self.rho)[:, None, None] * s
                + (self.rho * self.mu + epsilon)[:, None, None] * eye)


def ledoit_wolf(samples: torch.Tensor) -> LedoitWolf:
    """Ledoit–Wolf shrinkage towards μI of each position's sample covariance (1/k normalised).

    samples: (P, k, d), k samples at each of P positions

    All terms come from the k×k Gram matrix G = X Xᵀ of the centred samples X:
    tr S = tr G / k, ‖S‖²_F = ‖G‖²_F / k², Σ_i ‖x_i‖⁴ = Σ_i G_ii².
    """
    _, k, d = samples.shape
    mean = samples.mean(dim=1)
    x = samples - mean.unsqueeze(1)
    gram = x @ x.transpose(1, 2)  # (P, k, k)
    diag = gram.diagonal(dim1=1, dim2=2)  # ‖x_i‖², (P, k)
    mu = diag.sum(1) / (k * d)
    s_sq = gram.square().sum(dim=(1, 2)) / k**2  # ‖S‖²_F
    delta = (s_sq - d * mu.square()).clamp_min(0) / d  # ‖S − μI‖²_F / d
    beta = ((diag.square().sum(1) / k - s_sq) / (d * k)).clamp_min(0)
    beta = torch.minimum(beta, delta)
    rho = torch.where(delta > 0, beta / delta.clamp_min(torch.finfo(delta.dtype).tiny),
                      torch.zeros_like(delta))
    return LedoitWolf(mean, x, rho, mu)


@dataclass
class PadimMemory:
    """A Gaussian per position of the (h, w) grid, d channels.

    mean:     (P, d), P = h·w
    centered: (P, k, d) the references minus the mean
    inner:    (P, k, k) c·(aI + cG)⁻¹, the Woodbury core of Σ = aI + c·XᵀX
              (sample: c = 1/(k − 1), a = ε; ledoit-wolf: c = (1 − ρ)/k, a = ρμ + ε)
    alpha:    (P,) a, Σ's isotropic part
    channels: (d,) the kept channels of the concatenated embedding
    grid, stride: the map's (h, w) and its stride in input pixels
    """

    mean: torch.Tensor
    centered: torch.Tensor
    inner: torch.Tensor
    alpha: torch.Tensor
    channels: torch.Tensor
    grid: tuple[int, int]
    stride: int


class Padim:
    """PaDiM on a CNN extractor's maps at ``strides`` (Features keys ``s4``, ``s8``, ...).

    build_memory(references) → PadimMemory (k ≥ 1)
    score(queries, memory)   → score (B,) max of the blurred upsampled map,
                               patch_map (B, h, w) Mahalanobis distances on the finest grid,
                               components {"map_max": (B,) max of the raw map}

    Needs k ≥ 1; what k = 1 does to the covariance is in the module docstring.
    """

    name = "padim"
    min_k = 1
    uses_pooled = False

    def __init__(self, strides: tuple[int, ...] = PADIM_STRIDES,
                 n_features: int = DEFAULT_N_FEATURES, seed: int = 0,
                 epsilon: float = EPSILON, sigma: float = SIGMA,
                 covariance: str = SAMPLE) -> None:
        if not strides or n_features < 1 or epsilon <= 0:
            raise ValueError("PaDiM needs strides, n_features ≥ 1 and epsilon > 0")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.strides = tuple(sorted(strides))
        self.n_features = n_features
        self.seed = seed
        self.epsilon = epsilon
        self.sigma = sigma
        self.covariance = covariance

    def embed(self, features: Features, channels: torch.Tensor | None = None) -> torch.Tensor:
        """The maps concatenated along channels, coarser ones upsampled (nearest) to the finest
        grid, and only ``channels`` (indices into the concatenation) kept: (B, P, d).

        The subset is taken per map before upsampling; the result equals selecting from the
        full concatenation, at a fraction of the memory."""
        maps = [features[stage_key(s)].float() for s in self.strides]
        size = maps[0].shape[-2:]
        offset, parts = 0, []
        for m in maps:
            c = m.shape[1]
            if channels is not None:
                mine = channels[(channels >= offset) & (channels < offset + c)] - offset
                m = m[:, mine]
            offset += c
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="nearest")
            parts.append(m.flatten(2))
        return torch.cat(parts, dim=1).transpose(1, 2).contiguous()

    def channel_subset(self, total: int, device: torch.device | str) -> torch.Tensor:
        """The seeded random subset of min(n_features, total) channels, sorted: (d,)."""
        gen = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(total, generator=gen)[:min(self.n_features, total)]
        return keep.sort().values.to(device)

    def build_memory(self, references: Features, context=None) -> PadimMemory:
        k = batch_size(references)
        if k < self.min_k:
            raise ValueError(f"{self.name} needs at least {self.min_k} reference, got {k}")
        total = sum(references[stage_key(s)].shape[1] for s in self.strides)
        h, w = references[stage_key(self.strides[0])].shape[-2:]
        channels = self.channel_subset(total, references[stage_key(self.strides[0])].device)
        x = self.embed(references, channels).transpose(0, 1).contiguous()  # (P, k, d)
        if self.covariance == LEDOIT_WOLF:
            lw = ledoit_wolf(x)
            mean, centered = lw.mean, lw.centered
            alpha = lw.rho * lw.mu + self.epsilon  # (P,)
            coef = (1 - lw.rho) / k
        else:
            mean = x.mean(dim=1)
            centered = x - mean.unsqueeze(1)
            alpha = x.new_full((x.shape[0],), self.epsilon)
            coef = x.new_full((x.shape[0],), 1.0 / max(k - 1, 1))  # X = 0 at k = 1
        gram = centered @ centered.transpose(1, 2)  # (P, k, k)
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        core = alpha[:, None, None] * eye + coef[:, None, None] * gram
        inner = coef[:, None, None] * torch.linalg.inv(core)
        stride = self.strides[0]
        return PadimMemory(mean, centered, inner, alpha, channels, (h, w), stride)

    def distance_map(self, queries: Features, memory: PadimMemory) -> torch.Tensor:
        """Mahalanobis distance at every position: (B, h, w).

        d² = (‖r‖² − yᵀ·inner·y) / a with r = x − μ and y = X r (Woodbury)."""
        b = batch_size(queries)
        h, w = queries[stage_key(self.strides[0])].shape[-2:]
        if (h, w) != memory.grid:
            raise ValueError(f"queries' grid {(h, w)} is not the memory's {memory.grid}")
        x = self.embed(queries, memory.channels)  # (B, P, d)
        p, d = memory.mean.shape
        step = max(1, _MAX_ELEMENTS // max(p * d, 1))
        out = []
        for start in range(0, b, step):
            r = x[start:start + step] - memory.mean  # (n, P, d)
            y = torch.einsum("pkd,npd->npk", memory.centered, r)
            quad = torch.einsum("npk,pkl,npl->np", y, memory.inner, y)
            d2 = (r.square().sum(-1) - quad) / memory.alpha
            out.append(d2.clamp_min(0).sqrt())
        dist = torch.cat(out) if out else x.new_zeros((0, p))
        return dist.view(b, h, w)

    def score(self, queries: Features, memory: PadimMemory) -> ScorerOutput:
        dist = self.distance_map(queries, memory)
        b, h, w = dist.shape
        if b == 0:
            return ScorerOutput(dist.new_zeros(0), dist, {"map_max": dist.new_zeros(0)})
        size = (h * memory.stride, w * memory.stride)  # the input's pixels
        full = F.interpolate(dist.unsqueeze(1), size=size, mode="bilinear",
                             align_corners=False).squeeze(1)
        smooth = gaussian_blur(full, self.sigma)
        return ScorerOutput(smooth.flatten(1).amax(1), dist,
                            {"map_max": dist.flatten(1).amax(1)})


class PadimEntry(ScorerEntry):
    """PaDiM on the CNN extractor's layers 1–3, the paper's d for its backbone."""

    name = Padim.name
    extractor = CNN
    min_k = Padim.min_k
    options = (
        Option("padim_covariance", SAMPLE,
               "padim: each position's covariance: 'sample' (the paper's, k − 1 normalised, "
               "+ 0.01·I; default) or 'ledoit-wolf' (shrunk towards its mean variance, + "
               "0.01·I)", choices=COVARIANCES),
    )

    def requirements(self, models: Models) -> Mapping[str, Any]:
        return {"strides": PADIM_STRIDES}

    def build(self, models: Models) -> Padim:
        return Padim(n_features=paper_features(models.setting("cnn_backbone")),
                     covariance=models.setting("padim_covariance"))


PADIM_ENTRY = PadimEntry()
