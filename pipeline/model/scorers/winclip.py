"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023) on the project's open_clip backbone.

Features (``WinClipExtractor``): the CLIP ViT runs once on the whole image and once on every
stride-1 window of the patch grid at each scale (2×2 and 3×3 patches by default, WinCLIP's
small and mid scales for the 15×15 grid of ViT-B-16+ at 240 px). A window's embedding is the
class-token output of the ViT run on the class token plus that window's patch tokens only
(token selection after the patch embedding, positional embedding and ``ln_pre``, so each
patch keeps its position), projected into the joint space. The whole-grid window is the
ordinary image embedding.

Zero-shot WinCLIP (k = 0): a window's language-guided score is the softmax probability of
the anomalous class, s(f) = exp(⟨f, t_a⟩/τ) / (exp(⟨f, t_n⟩/τ) + exp(⟨f, t_a⟩/τ)). Each patch
takes the harmonic mean of the scores of the windows covering it, per scale; the scales and
the whole-image score (one value over all patches) are combined by a harmonic mean again. The
image score is s of the whole-image embedding.

WinCLIP+ (k ≥ 1): per scale, a query window's few-shot score is its smallest distance
½(1 − cos) to all reference windows of that scale (every position of every reference); the
windows are aggregated to patches harmonically as above and the scales averaged together with
the patch-level memory (the final-block patch tokens of the whole-image forward, compared
patch to patch the same way). Map = ½(zero-shot map + few-shot map); image score =
½(zero-shot image score + max of the few-shot map).

Text features (``winclip_text_features``): the compositional prompt ensemble's embeddings,
L2-normalised, averaged per side and re-normalised: ``context["text"]`` = (2, embed_dim),
row 0 normal, row 1 anomalous.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.model.backbone import BackboneSpec, ClipBackbone, describe, get_backbone
from pipeline.model.inctrl import encode_prompt_pair
from pipeline.model.maps import InputGeometry, Smoothing
from pipeline.model.prompts import state_prompts
from pipeline.model.scorers.anomalydino import DEFAULT_CHUNK, nearest_cosine_distance
from pipeline.model.scorers.base import (TEXT, ExtractorEntry, Features, Models, Option,
                                         ScorerEntry, ScorerOutput)
from pipeline.model.shared import shared

#: Features keys: (B, embed_dim) whole-image embedding and (B, patches, width) patch tokens,
#: both L2-normalised; windows under ``window_key(scale)``: (B, windows, embed_dim)
IMAGE = "image"
PATCHES = "patches"
#: window sizes in patches: WinCLIP's small and mid scales
DEFAULT_SCALES: tuple[tuple[int, int], ...] = ((2, 2), (3, 3))
#: τ of the language-guided softmax (CLIP's initial temperature, as anomalib uses)
DEFAULT_TEMPERATURE = 0.07
# Harmonic means clamp their terms here so a zero (an exact match) gives ~0, never NaN.
_EPS = 1e-12

Scale = tuple[int, int]


def as_scale(scale: int | Sequence[int]) -> Scale:
    """``2`` or ``(2, 2)`` → (rows, cols) of a window in patches."""
    rows, cols = (scale, scale) if isinstance(scale, int) else tuple(scale)
    if rows < 1 or cols < 1:
        raise ValueError(f"a window covers at least one patch, got {scale}")
    return int(rows), int(cols)


def window_key(scale: Scale) -> str:
    return f"windows_{scale[0]}x{scale[1]}"


def window_indices(grid: tuple[int, int], scale: Scale) -> torch.Tensor:
    """Patch indices (row-major over the grid) of every stride-1 window inside the grid.

    returns (windows, rows·cols) long; windows ordered by their top-left corner, row-major,
    and each window's patches row-major
    """
    gh, gw = grid
    sh, sw = scale
    if sh > gh or sw > gw:
        raise ValueError(f"a {sh}x{sw} window does not fit the {gh}x{gw} patch grid")
    top = torch.arange(gh - sh + 1).view(-1, 1, 1, 1)
    left = torch.arange(gw - sw + 1).view(1, -1, 1, 1)
    dy = torch.arange(sh).view(1, 1, -1, 1)
    dx = torch.arange(sw).view(1, 1, 1, -1)
    return ((top + dy) * gw + left + dx).reshape(-1, sh * sw)


def coverage_matrix(indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(windows, k) patch indices → (windows, patches) float, 1 where a window covers a patch."""
    cover = torch.zeros(indices.shape[0], num_patches)
    return cover.scatter_(1, indices, 1.0)


@dataclass(frozen=True)
class WindowLayout:
    """The patch grid and the window scales: everything the scorer needs to map windows to
    patches. Built by the extractor from the model config; give the same to the scorer."""

    grid: tuple[int, int]
    scales: tuple[Scale, ...] = DEFAULT_SCALES
    _cover: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(as_scale(s) for s in self.scales))
        if not self.scales:
            raise ValueError("WinCLIP needs at least one window scale")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"window scales repeat: {self.scales}")
        for s in self.scales:
            window_indices(self.grid, s)  # validates the fit

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def indices(self, scale: Scale) -> torch.Tensor:
        return window_indices(self.grid, scale)

    def coverage(self, scale: Scale, device: torch.device | str = "cpu") -> torch.Tensor:
        """(windows, patches) 0/1 cover matrix of a scale, cached per device."""
        key = (scale, str(device))
        if key not in self._cover:
            self._cover[key] = coverage_matrix(self.indices(scale), self.num_patches).to(device)
        return self._cover[key]


# ------------------------------------------------------------------ the math


def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it.

    window_scores: (B, windows) ≥ 0; coverage: (windows, patches) 0/1
    returns (B, patches): n_i / Σ_{j covers i} 1/s_j (0 for a patch no window covers)
    """
    count = coverage.sum(dim=0)  # (patches,)
    inverse = window_scores.clamp_min(_EPS).reciprocal() @ coverage  # (B, patches)
    return torch.where(count > 0, count / inverse.clamp_min(_EPS), torch.zeros_like(inverse))


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise harmonic mean of equally shaped non-negative tensors."""
    stacked = torch.stack(list(maps)).clamp_min(_EPS)
    return len(maps) / stacked.reciprocal().sum(dim=0)


def language_scores(embeds: torch.Tensor, text: torch.Tensor,
                    temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """P(anomalous) of each embedding under the two-class text softmax (WinCLIP Eq. 1).

    embeds: (..., D) L2-normalised; text: (2, D) L2-normalised [normal, anomalous]
    returns (...)
    """
    return ((embeds @ text.T) / temperature).softmax(dim=-1)[..., 1]


def _check_text(text: torch.Tensor) -> torch.Tensor:
    if text.ndim != 2 or text.shape[0] != 2:
        raise ValueError(f"WinCLIP's text features are (2, embed_dim) [normal, anomalous], "
                         f"got {tuple(text.shape)}")
    return F.normalize(text.float(), dim=-1)


def _windows(features: Features, layout: WindowLayout, scale: Scale) -> torch.Tensor:
    key = window_key(scale)
    if key not in features:
        raise KeyError(f"WinCLIP Features lack {key!r} (have {sorted(features)}); extract "
                       f"with the layout the scorer was built with ({layout.scales})")
    windows = features[key].float()
    n = layout.indices(scale).shape[0]
    if windows.ndim != 3 or windows.shape[1] != n:
        raise ValueError(f"{key!r} must be (batch, {n}, embed_dim) for grid {layout.grid}, "
                         f"got {tuple(windows.shape)}")
    return windows


def zero_shot_map(features: Features, text: torch.Tensor, layout: WindowLayout,
                  temperature: float = DEFAULT_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Language-guided WinCLIP.

    features: IMAGE (B, D) and every scale's windows (B, n_s, D), L2-normalised
    text: (2, D) L2-normalised
    returns (image score (B,), map (B, gh, gw))
    """
    image = language_scores(features[IMAGE].float(), text, temperature)  # (B,)
    maps = [image.unsqueeze(1).expand(-1, layout.num_patches)]
    for scale in layout.scales:
        scores = language_scores(_windows(features, layout, scale), text, temperature)
        maps.append(harmonic_aggregation(scores, layout.coverage(scale, scores.device)))
    return image, harmonic_mean(maps).view(-1, *layout.grid)


def association(queries: torch.Tensor, bank: torch.Tensor,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """min over the bank of ½(1 − cos) (WinCLIP's visual association score).

    queries: (B, n, D), bank: (m, D), both L2-normalised → (B, n)
    """
    b, n, d = queries.shape
    return 0.5 * nearest_cosine_distance(queries.reshape(b * n, d), bank, chunk).view(b, n)


@dataclass(frozen=True)
class WinClipMemory:
    """text: (2, D) normal / anomalous embeddings; k: references. For k ≥ 1, windows:
    window_key → (k·n_s, D) every reference window of that scale; patches: (k·P, width) or
    None (patch memory off)."""

    text: torch.Tensor
    k: int
    windows: dict[str, torch.Tensor] = field(default_factory=dict)
    patches: torch.Tensor | None = None


def few_shot_map(features: Features, memory: WinClipMemory, layout: WindowLayout,
                 chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Vision-guided WinCLIP+ map, (B, gh, gw): the mean over the patch memory (if any) and
    every scale's harmonically aggregated window association scores."""
    maps = []
    if memory.patches is not None:
        patches = features[PATCHES].float()
        maps.append(association(patches, memory.patches.to(patches.device), chunk))
    for scale in layout.scales:
        windows = _windows(features, layout, scale)
        bank = memory.windows[window_key(scale)].to(windows.device)
        scores = association(windows, bank, chunk)
        maps.append(harmonic_aggregation(scores, layout.coverage(scale, windows.device)))
    return torch.stack(maps).mean(dim=0).view(-1, *layout.grid)


class WinClipScorer:
    """WinCLIP (k = 0) and WinCLIP+ (k ≥ 1) behind the scorer seam."""

    #: how its maps are smoothed (``pipeline.model.maps.Smoothing``)
    smoothing = Smoothing(sigma=0.0)  # anomalib's WinCLIP: no blur
    name = "winclip"
    min_k = 0

    def __init__(self, layout: WindowLayout, temperature: float = DEFAULT_TEMPERATURE,
                 patch_memory: bool = True, chunk: int = DEFAULT_CHUNK) -> None:
        """``layout``: the extractor's (grid and scales); ``patch_memory``: include the
        patch-level reference memory in WinCLIP+, as the paper does."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.layout = layout
        self.temperature = temperature
        self.patch_memory = patch_memory
        self.chunk = chunk

    def build_memory(self, references: Features,
                     context: Mapping[str, Any] | None = None) -> WinClipMemory:
        """``context[TEXT]``: (2, D) from ``winclip_text_features``; references may be empty
        (k = 0, zero-shot) or the extractor's Features of k normal images."""
        if not context or TEXT not in context:
            raise ValueError(f"winclip needs the category's text features as "
                             f"context[{TEXT!r}] (winclip_text_features), also for k ≥ 1")
        text = _check_text(torch.as_tensor(context[TEXT]))
        k = references[IMAGE].shape[0] if IMAGE in references else 0
        if k == 0:
            return WinClipMemory(text=text, k=0)
        windows = {}
        for scale in self.layout.scales:
            w = _windows(references, self.layout, scale)
            windows[window_key(scale)] = F.normalize(w, dim=-1).reshape(-1, w.shape[-1])
        patches = None
        if self.patch_memory:
            p = references[PATCHES].float()
            patches = F.normalize(p, dim=-1).reshape(-1, p.shape[-1])
        return WinClipMemory(text=text.to(references[IMAGE].device), k=k, windows=windows,
                             patches=patches)

    def score(self, queries: Features, memory: WinClipMemory) -> ScorerOutput:
        """score (B,), patch_map (B, gh, gw); components: zero_shot (B,) always, few_shot
        (B,) = max of the few-shot map when k ≥ 1."""
        text = memory.text.to(queries[IMAGE].device)
        image, zs_map = zero_shot_map(queries, text, self.layout, self.temperature)
        if memory.k == 0:
            return ScorerOutput(score=image, patch_map=zs_map, components={"zero_shot": image})
        fs_map = few_shot_map(queries, memory, self.layout, self.chunk)
        fs_max = fs_map.flatten(1).amax(dim=1)
        return ScorerOutput(score=0.5 * (image + fs_max), patch_map=0.5 * (zs_map + fs_map),
                            components={"zero_shot": image, "few_shot": fs_max})


# ------------------------------------------------------------------ the CLIP side


@torch.no_grad()
def winclip_text_features(backbone: ClipBackbone, category: str) -> torch.Tensor:
    """WinCLIP's class embeddings of a category, (2, embed_dim) [normal, anomalous],
    L2-normalised, on the backbone's device. Compute once per category.

    WinCLIP's compositional ensemble (7 normal and 4 anomalous states × 22 templates) is the
    one InCTRL adopted, so this is InCTRL's state-prompt pair: one encoding per category
    serves both scorers."""
    return encode_prompt_pair(backbone, *state_prompts(category))


class WinClipExtractor:
    """Whole-image, patch and multi-scale window embeddings of the backbone's CLIP ViT.

    Features (all float32, L2-normalised, on the backbone's device):
      IMAGE:   (B, embed_dim) the ordinary image embedding
      PATCHES: (B, gh·gw, width) final-block patch tokens after ``ln_post`` (not projected)
      window_key(s): (B, windows_s, embed_dim) for each scale s of ``self.layout``
    """

    def __init__(self, backbone: ClipBackbone,
                 scales: Sequence[int | Sequence[int]] = DEFAULT_SCALES,
                 window_batch: int = 4096) -> None:
        """``scales``: window sizes in patches; ``window_batch``: sequences per ViT call."""
        visual = backbone.model.visual
        # open_clip has no public entry between the token embedding and the blocks, so the
        # window forward composes the ViT's own _embeds / transformer / _pool, as its
        # forward() does; the tests check that the whole-grid window is the image embedding.
        for attr in ("_embeds", "_pool", "transformer"):
            if not hasattr(visual, attr):
                raise TypeError(f"{backbone.spec.name!r}: the window extractor needs an "
                                f"open_clip VisionTransformer (no {attr!r})")
        if window_batch < 1:
            raise ValueError(f"window_batch must be positive, got {window_batch}")
        self.backbone = backbone
        self.visual = visual
        self.device = backbone.device
        self.layout = WindowLayout(backbone.geometry.grid, tuple(as_scale(s) for s in scales))
        self.window_batch = window_batch
        self._indices = {s: self.layout.indices(s).to(self.device) for s in self.layout.scales}
        names = ",".join(f"{h}x{w}" for h, w in self.layout.scales)
        self.identity = f"winclip:{backbone.spec.backbone_id}:windows={names}"

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """The backbone's own open_clip transform."""
        return self.backbone.preprocess

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.visual.proj
        return pooled if proj is None else pooled @ proj

    def _window_embeds(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """tokens: (B, 1 + P, width) after ``ln_pre``; indices: (n, s) → (B, n, embed_dim)."""
        b, _, width = tokens.shape
        n, s = indices.shape
        cls = tokens[:, :1].unsqueeze(1).expand(b, n, 1, width)  # (B, n, 1, width)
        patches = tokens[:, 1:][:, indices]  # (B, n, s, width)
        seqs = torch.cat([cls, patches], dim=2).reshape(b * n, 1 + s, width)
        out = [self._project(self.visual._pool(self.visual.transformer(chunk))[0])
               for chunk in seqs.split(self.window_batch)]
        return torch.cat(out).view(b, n, -1)

    @torch.no_grad()
    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) from ``preprocess`` → the Features above."""
        # The backbone's precision: its bf16 image tower on the CPU, autocast on a GPU.
        pixels = pixels.to(self.device, self.backbone.image_dtype, non_blocking=True)
        with self.backbone.image_forward():
            tokens = self.visual._embeds(pixels)  # (B, 1 + P, width), as the ViT sees them
            pooled, patch_tokens = self.visual._pool(self.visual.transformer(tokens))
            out = {IMAGE: F.normalize(self._project(pooled).float(), dim=-1),
                   PATCHES: F.normalize(patch_tokens.float(), dim=-1)}
            for scale, idx in self._indices.items():
                out[window_key(scale)] = F.normalize(
                    self._window_embeds(tokens, idx).float(), dim=-1)
        return out


# ------------------------------------------------------------------ the entries

WINDOWS = "windows"


def scale_list(text: str) -> tuple[Scale, ...]:
    """``--winclip-scales 2,3`` or ``2x2,3x3``: window sizes in patches, each once."""
    out: list[Scale] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            h, _, w = part.lower().partition("x")
            scale = as_scale((int(h), int(w)) if w else int(h))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected window sizes such as 2,3 or 2x2,3x3, got {text!r}") from exc
        if min(scale) < 1:
            raise argparse.ArgumentTypeError(f"window sizes must be positive, got {text!r}")
        if scale not in out:
            out.append(scale)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one window size")
    return tuple(out)


@dataclass(frozen=True)
class WindowsSpec:
    """The CLIP model and the window scales: hashable, keys the loaded extractor."""

    clip: BackboneSpec
    scales: tuple[Scale, ...] = DEFAULT_SCALES


class WindowsEntry(ExtractorEntry):
    """WinCLIP's windows on the run's CLIP model (its view is CLIP's)."""

    name = WINDOWS
    view = "clip"
    clip_based = True
    options = (Option("winclip_scales", DEFAULT_SCALES,
                      "winclip: window sizes in patches (default 2x2,3x3: the small and mid "
                      "scales for a 15x15 grid)", type=scale_list, metavar="SIZES"),)

    def spec(self, models: Models, needs: Sequence[Mapping[str, Any]]) -> WindowsSpec:
        return WindowsSpec(models.clip, tuple(models.setting("winclip_scales")))

    def preprocess(self, spec: WindowsSpec) -> Callable[[Any], torch.Tensor]:
        return describe(spec.clip).preprocess

    def identity(self, spec: WindowsSpec) -> str:
        names = ",".join(f"{h}x{w}" for h, w in spec.scales)
        return f"windows|{spec.clip.feature_id}|scales={names}"

    def load(self, spec: WindowsSpec) -> "WinClipExtractor":
        return shared(WINDOWS, spec, lambda: WinClipExtractor(get_backbone(spec.clip),
                                                              spec.scales))

    def geometry(self, spec: WindowsSpec, grid: tuple[int, int]) -> InputGeometry:
        side = describe(spec.clip).geometry.image_size
        return InputGeometry.center_crop(side[0], side)

    def descriptor(self, features: Features) -> torch.Tensor:
        """The whole-image embedding."""
        return features[IMAGE]

    def model_of(self, spec: WindowsSpec) -> tuple[str, str]:
        return spec.clip.name, spec.clip.weights_id


class WinClipEntry(ScorerEntry):
    """WinCLIP (k = 0) and WinCLIP+ (k ≥ 1) on the windows extractor, with the category's
    prompt pair."""

    name = WinClipScorer.name
    extractor = WINDOWS
    min_k = WinClipScorer.min_k
    needs_text = True
    smoothing = WinClipScorer.smoothing

    def build(self, models: Models) -> WinClipScorer:
        grid = describe(models.clip).geometry.grid
        return WinClipScorer(WindowLayout(grid, tuple(models.setting("winclip_scales"))))


WINDOWS_ENTRY = WindowsEntry()
WINCLIP_ENTRY = WinClipEntry()
