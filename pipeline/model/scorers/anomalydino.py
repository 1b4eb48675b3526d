"""AnomalyDINO (Damm et al., WACV 2025): nearest-neighbour patch distances on DINOv2 features,
with the defaults of its authors' code (dammsi/AnomalyDINO, ``--preprocess agnostic``).

The memory is every patch of the k reference images (L2-normalised) and of their rotated
copies: the extractor's ``extract_references`` gives each reference at 8 angles, 45° apart
(``ROTATED``), as the official code augments every object's references. A query patch scores
its cosine distance to the nearest memory patch, d(p) = min_r (1 − cos(p, r)); the image score
is the mean of the top 1 % patch distances (at least one patch), the paper's empirical tail
value at risk. Background masking follows the paper's zero-cost PCA test (the first principal
component of an image's own patch features, thresholded, dilated and closed); masked query
patches score 0. ``masking="auto"`` masks the categories the official code masks by default
(MVTec AD's capsule, hazelnut, pill, screw and toothbrush, and every VisA category, by their
names); ``"on"`` and ``"off"`` apply to every category. References are never masked unless
``mask_references`` (the official ``--mask_ref_images``, off there too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.model.maps import Smoothing
from pipeline.model.scorers.base import (CATEGORY, Features, Models, Option, ScorerEntry, ScorerOutput,
                                         positive_int)

#: the Features key this scorer reads: (batch, h, w, channels) patch tokens, not normalised
PATCHES = "patches"
#: references' rotated copies, from the extractor's ``extract_references``:
#: (batch, rotations − 1, h, w, channels)
ROTATED = "rotated"
#: The official code's default rotations of each reference (0°, 45°, ..., 315°).
DEFAULT_ROTATIONS = 8
MASKINGS = ("auto", "on", "off")
#: Categories the official ``agnostic`` preprocessing masks: MVTec AD's objects that do not
#: fill the frame, and all of VisA.
MASKED_CATEGORIES = frozenset({
    "capsule", "hazelnut", "pill", "screw", "toothbrush",
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"})

# Each block of similarities holds about this many elements (16 MiB in float32).
DEFAULT_CHUNK = 1 << 22


def nearest_cosine_distance(queries: torch.Tensor, bank: torch.Tensor,
                            chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """min_j (1 − ⟨q_i, b_j⟩) for L2-normalised rows, in bounded memory.

    queries: (n, d), bank: (m, d) with m ≥ 1, both L2-normalised
    returns (n,), clamped at 0

    Similarity blocks of at most about ``chunk`` elements are formed (rows of queries ×
    columns of bank) and merged with a running maximum, so the result does not depend on
    ``chunk``.
    """
    n, d = queries.shape
    m = bank.shape[0]
    if bank.ndim != 2 or bank.shape[1] != d:
        raise ValueError(f"queries have width {d}, the bank has shape {tuple(bank.shape)}")
    if m == 0:
        raise ValueError("the reference bank is empty")
    cols = min(m, max(1, chunk))
    rows = max(1, chunk // cols)
    out = []
    for r0 in range(0, n, rows):
        q = queries[r0:r0 + rows]
        best = None
        for c0 in range(0, m, cols):
            sim = (q @ bank[c0:c0 + cols].T).amax(dim=1)  # (rows,)
            best = sim if best is None else torch.maximum(best, sim)
        out.append(best)
    if not out:
        return queries.new_zeros(0)
    return (1.0 - torch.cat(out)).clamp_min_(0.0)


def top_fraction_mean(distances: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Mean of the largest ``fraction`` of each row, at least one value (the paper's q).

    distances: (batch, patches) → (batch,); the count is ⌊fraction · patches⌋ or 1
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, int(distances.shape[1] * fraction))
    return distances.topk(count, dim=1).values.mean(dim=1)


def first_principal_scores(x: torch.Tensor) -> torch.Tensor:
    """Each row's projection on the first principal component of its own set.

    x: (batch, n, c) → (batch, n). The sign is fixed so that the score of largest magnitude
    is positive (scikit-learn's ``svd_flip`` on U); ``foreground_mask`` re-orients anyway.
    """
    xc = x - x.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    scores = u[..., 0] * s[..., :1]  # (batch, n)
    pick = scores.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(scores.gather(1, pick))
    return scores * torch.where(sign == 0, torch.ones_like(sign), sign)


def _dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, h, w) bool → bool; outside the grid counts as background."""
    return F.max_pool2d(mask.float().unsqueeze(1), kernel, 1, kernel // 2).squeeze(1) > 0


def _erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, h, w) bool → bool; outside the grid counts as foreground (OpenCV's default)."""
    return -F.max_pool2d(-mask.float().unsqueeze(1), kernel, 1, kernel // 2).squeeze(1) > 0


def foreground_mask(patches: torch.Tensor, threshold: float = 10.0, border: float = 0.2,
                    kernel: int = 3, center_fraction: float = 0.35) -> torch.Tensor:
    """AnomalyDINO's PCA foreground test, for every image of a batch at once.

    patches: (batch, h, w, c) raw patch features → (batch, h, w) bool, True = object.
    The first principal component of an image's patches, > ``threshold``, is the object; if
    at most ``center_fraction`` of the centre crop (``border`` cut from each side) is then
    kept, the component points the other way and −pc > threshold is used. The mask is then
    dilated and closed with a ``kernel`` × ``kernel`` square.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the kernel must be a positive odd size, got {kernel}")
    b, h, w, c = patches.shape
    pc = first_principal_scores(patches.reshape(b, h * w, c).float()).view(b, h, w)
    mask = pc > threshold
    r0, r1 = int(h * border), int(h * (1 - border))
    c0, c1 = int(w * border), int(w * (1 - border))
    center = mask[:, r0:r1, c0:c1]
    if center[0].numel():
        flip = center.sum(dim=(1, 2)) <= center[0].numel() * center_fraction  # (batch,)
        mask = torch.where(flip.view(b, 1, 1), -pc > threshold, mask)
    mask = _dilate(mask, kernel)  # enlarge slightly, then close small holes
    return _erode(_dilate(mask, kernel), kernel)  # closing = dilation, then erosion


@dataclass(frozen=True)
class AnomalyDinoMemory:
    """bank: (m, c) L2-normalised reference patches; k: how many references made it;
    masked: whether query backgrounds are masked for this group's category."""

    bank: torch.Tensor
    k: int
    masked: bool = False


def _patches(features: Features) -> torch.Tensor:
    if PATCHES not in features:
        raise KeyError(f"anomalydino reads Features[{PATCHES!r}] (batch, h, w, c); got "
                       f"{sorted(features)}")
    patches = features[PATCHES]
    if patches.ndim != 4:
        raise ValueError(f"{PATCHES!r} must be (batch, h, w, c), got {tuple(patches.shape)}")
    return patches.float()


class AnomalyDinoScorer:
    """Few-shot only (k ≥ 1): nearest reference patch by cosine distance, top-1 % mean."""

    #: how its maps are smoothed (``pipeline.model.maps.Smoothing``)
    smoothing = Smoothing(sigma=4.0, on_original=True)  # official: σ = 4 at the image's size
    name = "anomalydino"
    min_k = 1

    def __init__(self, top_fraction: float = 0.01, masking: str = "auto",
                 mask_references: bool = False, mask_threshold: float = 10.0,
                 mask_border: float = 0.2, mask_kernel: int = 3,
                 chunk: int = DEFAULT_CHUNK) -> None:
        """``masking`` zeroes the distances of query patches the PCA test calls background:
        ``auto`` for ``MASKED_CATEGORIES`` only (the official default), ``on`` or ``off`` for
        every category; ``mask_references`` also drops background patches from the memory of
        masked categories. The threshold suits DINOv2's unnormalised features."""
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
        if mask_references and masking == "off":
            raise ValueError("mask_references needs masking 'auto' or 'on'")
        self.top_fraction = top_fraction
        self.masking = masking
        self.mask_references = mask_references
        self.mask_args = dict(threshold=mask_threshold, border=mask_border, kernel=mask_kernel)
        self.chunk = chunk

    def masks(self, category: str | None) -> bool:
        """Whether query backgrounds of ``category`` are masked."""
        if self.masking == "auto":
            return category is not None and category.lower() in MASKED_CATEGORIES
        return self.masking == "on"

    def build_memory(self, references: Features,
                     context: Mapping[str, Any] | None = None) -> AnomalyDinoMemory:
        """All reference patches and those of their rotated copies, (m, c) L2-normalised
        (background patches dropped with ``mask_references`` where the category is masked).
        ``context[CATEGORY]`` names the group's category."""
        k = references[PATCHES].shape[0] if PATCHES in references else 0
        if k < self.min_k:
            raise ValueError(f"anomalydino needs at least {self.min_k} reference image(s) "
                             f"(k ≥ {self.min_k}); it has no zero-shot mode, got k = {k}")
        masked = self.masks((context or {}).get(CATEGORY))
        patches = _patches(references)
        if ROTATED in references:
            rotated = references[ROTATED].float()
            patches = torch.cat([patches, rotated.reshape(-1, *rotated.shape[2:])])
        bank = F.normalize(patches, dim=-1).reshape(-1, patches.shape[-1])
        if self.mask_references and masked:
            keep = foreground_mask(patches, **self.mask_args).reshape(-1)
            if keep.any():  # a mask that drops everything would leave nothing to compare to
                bank = bank[keep]
        return AnomalyDinoMemory(bank=bank, k=k, masked=masked)

    def score(self, queries: Features, memory: AnomalyDinoMemory) -> ScorerOutput:
        """score (B,) top-1 % mean; patch_map (B, h, w) distances; components: max_patch."""
        patches = _patches(queries)
        b, h, w, c = patches.shape
        q = F.normalize(patches, dim=-1).reshape(b * h * w, c)
        dist = nearest_cosine_distance(q, memory.bank.to(q.device), self.chunk).view(b, h, w)
        if memory.masked:
            dist = dist * foreground_mask(patches, **self.mask_args)
        flat = dist.reshape(b, h * w)
        return ScorerOutput(score=top_fraction_mean(flat, self.top_fraction), patch_map=dist,
                            components={"max_patch": flat.amax(dim=1)})


class AnomalyDinoEntry(ScorerEntry):
    """AnomalyDINO on the DINO extractor, with the official code's default rotations and
    masking."""

    name = AnomalyDinoScorer.name
    extractor = "dino"
    min_k = AnomalyDinoScorer.min_k
    smoothing = AnomalyDinoScorer.smoothing
    options = (
        Option("anomalydino_rotations", DEFAULT_ROTATIONS,
               "anomalydino: each reference also at N angles evenly around the circle "
               "(default 8, as the official code; 1: no rotation)", type=positive_int,
               metavar="N"),
        Option("anomalydino_masking", "auto",
               "anomalydino: mask query backgrounds (PCA test); auto: the official default's "
               "categories (MVTec's capsule, hazelnut, pill, screw, toothbrush and all of "
               "VisA, by name)", choices=MASKINGS),
    )

    def requirements(self, models: Models) -> Mapping[str, Any]:
        return {"rotations": models.setting("anomalydino_rotations")}

    def build(self, models: Models) -> AnomalyDinoScorer:
        return AnomalyDinoScorer(masking=models.setting("anomalydino_masking"))


ANOMALYDINO_ENTRY = AnomalyDinoEntry()
