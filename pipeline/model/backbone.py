"""A thin wrapper around an open_clip CLIP model: loading, geometry and feature extraction.

The wrapper never changes open_clip's code. It loads a model by name and ``pretrained``
source, reads every size it needs from the model's own config, and exposes exactly the
features InCTRL consumes: patch tokens of a few intermediate ViT blocks and the pooled,
projected image embedding; plus text embeddings for the prompt prior.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

LOG = logging.getLogger(__name__)

DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"

# The tiny backbone exists for tests and offline demos only: random weights, tiny sizes.
# Its name says so, and the name is part of every model id written to outputs.
TINY_BACKBONE = "InCTRL-Tiny-ViT-TESTONLY"
TINY_PRETRAINED = "random:0"

RANDOM_PREFIX = "random"
_CONFIG_DIR = Path(__file__).with_name("configs")
_REGISTER_LOCK = threading.Lock()
_registered = False

# InCTRL reads blocks 7, 9 and 11 (counted from 1) of a 12-block ViT.
_REFERENCE_DEPTH = 12
_REFERENCE_BLOCKS = (7, 9, 11)

PRECISIONS = ("fp32", "tf32", "bf16")


class BackboneLoadError(RuntimeError):
    """The backbone (architecture or weights) could not be loaded; the message says why."""


def register_packaged_configs() -> None:
    """Make the configs shipped with this package (the tiny test backbone) known to open_clip."""
    global _registered
    with _REGISTER_LOCK:
        if not _registered:
            import open_clip

            open_clip.add_model_config(_CONFIG_DIR)
            _registered = True


def default_blocks(depth: int) -> tuple[int, ...]:
    """1-based block numbers at InCTRL's relative positions (7/12, 9/12, 11/12) of ``depth``."""
    if depth < 1:
        raise ValueError(f"a ViT needs at least one block, got depth {depth}")
    picked = []
    for b in _REFERENCE_BLOCKS:
        n = min(depth, max(1, int(depth * b / _REFERENCE_DEPTH + 0.5)))
        if n not in picked:
            picked.append(n)
    return tuple(picked)


@dataclass(frozen=True)
class BackboneSpec:
    """What to load and where to run it. Hashable: it keys per-process model caches.

    ``pretrained`` is an open_clip tag (``laion400m_e31``), a local weights file, a
    ``local-dir:`` or ``hf-hub:`` source, or ``random[:SEED]`` for seeded random weights.
    ``blocks`` are 1-based ViT block numbers; empty means InCTRL's relative positions.
    """

    name: str = DEFAULT_BACKBONE
    pretrained: str = DEFAULT_PRETRAINED
    blocks: tuple[int, ...] = ()
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks are counted from 1, got {self.blocks}")

    @property
    def is_random(self) -> bool:
        return self.pretrained == RANDOM_PREFIX or self.pretrained.startswith(RANDOM_PREFIX + ":")

    @property
    def random_seed(self) -> int:
        _, _, seed = self.pretrained.partition(":")
        return int(seed) if seed else 0

    @property
    def is_test_only(self) -> bool:
        return self.name == TINY_BACKBONE

    @property
    def backbone_id(self) -> str:
        """Identifies the features: architecture and weights (not device or precision)."""
        pretrained = self.pretrained
        if not self.is_random and os.path.exists(pretrained):
            pretrained = Path(pretrained).name
        return f"{self.name}@{pretrained}"


def tiny_spec(device: str = "cpu", precision: str = "fp32") -> BackboneSpec:
    """The shipped tiny, randomly initialised backbone (tests and offline demos only)."""
    return BackboneSpec(TINY_BACKBONE, TINY_PRETRAINED, device=device, precision=precision)


@dataclass(frozen=True)
class Geometry:
    """Sizes derived from the model config; nothing here is typed in by hand."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    token_width: int
    embed_dim: int
    depth: int
    blocks: tuple[int, ...]  # 1-based

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


@dataclass
class ImageFeatures:
    """Backbone output for a batch of images.

    tokens: (batch, layers, patches, token_width) raw patch tokens of the chosen blocks
    embeds: (batch, embed_dim) pooled, projected image embeddings (not normalised)
    """

    tokens: torch.Tensor
    embeds: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ImageFeatures":
        return ImageFeatures(self.tokens.to(device, dtype), self.embeds.to(device, dtype))

    def __getitem__(self, idx: int | slice) -> "ImageFeatures":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return ImageFeatures(self.tokens[idx], self.embeds[idx])

    @staticmethod
    def cat(items: Sequence["ImageFeatures"]) -> "ImageFeatures":
        return ImageFeatures(
            torch.cat([f.tokens for f in items]), torch.cat([f.embeds for f in items])
        )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneLoadError(f"device {device!r} was asked for, but CUDA is not available here")
    return dev


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _create(spec: BackboneSpec) -> tuple[torch.nn.Module, Callable, Callable]:
    """Build the open_clip model, its inference transform and tokenizer, or explain the failure."""
    import open_clip

    register_packaged_configs()
    model_name, pretrained = spec.name, spec.pretrained
    if pretrained.startswith(("local-dir:", "hf-hub:")):
        model_name, pretrained = pretrained, None  # open_clip takes these as the model name
    try:
        if spec.is_random:
            with _seeded(spec.random_seed):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None, load_weights=False
                )
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained
            )
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # open_clip raises many types; the user needs one clear message
        raise BackboneLoadError(
            f"could not load backbone {spec.name!r} with pretrained={spec.pretrained!r}: {exc}. "
            "Weights come from the Hugging Face cache (HF_HOME) or a download; on an offline "
            "machine pre-fetch them, or pass a local weights file, 'local-dir:DIR' or "
            "'hf-hub:ORG/REPO' as --pretrained."
        ) from exc
    return model, preprocess, tokenizer


def _geometry(model: torch.nn.Module, spec: BackboneSpec) -> Geometry:
    """Sizes read off an open_clip model's image tower (weights not needed)."""
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise BackboneLoadError(f"{spec.name!r} has no ViT image tower; InCTRL needs one")
    depth = len(visual.transformer.resblocks)
    # forward_intermediates yields each block once, in depth order; say so in the geometry.
    blocks = tuple(sorted(set(spec.blocks))) if spec.blocks else default_blocks(depth)
    if max(blocks) > depth:
        raise BackboneLoadError(f"blocks {blocks} exceed the depth {depth} of {spec.name!r}")
    image_size = _pair(visual.image_size)
    patch_size = _pair(visual.patch_size)
    return Geometry(
        image_size=image_size,
        patch_size=patch_size,
        grid=(image_size[0] // patch_size[0], image_size[1] // patch_size[1]),
        token_width=int(visual.transformer.width),
        embed_dim=int(visual.output_dim),
        depth=depth,
        blocks=tuple(blocks),
    )


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass(frozen=True)
class BackboneInfo:
    """What stages other than the image forward need: geometry, preprocessing and device.

    Read from the model config on PyTorch's 'meta' device: no weights are loaded and no
    device memory is taken, so decoding and scoring stages never hold a model copy.
    """

    geometry: Geometry
    preprocess: Callable
    device: torch.device


def _describe(spec: BackboneSpec) -> BackboneInfo:
    import open_clip

    register_packaged_configs()
    model_name, pretrained = spec.name, spec.pretrained
    if pretrained.startswith(("local-dir:", "hf-hub:")):
        model_name, pretrained = pretrained, None
    overrides = {}
    if pretrained and not spec.is_random and not os.path.exists(pretrained):
        # A tag may carry its own preprocessing (mean, std, ...), as loading it would apply.
        tag_cfg = open_clip.get_pretrained_cfg(spec.name, pretrained) or {}
        overrides = {f"image_{k}": tag_cfg[k] for k in _PREPROCESS_KEYS if k in tag_cfg}
    try:
        with torch.device("meta"):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None, load_weights=False, device="meta", **overrides)
    except Exception as exc:
        raise BackboneLoadError(f"could not read the config of backbone {spec.name!r}: {exc}") from exc
    return BackboneInfo(_geometry(model, spec), preprocess, _resolve_device(spec.device))


class ClipBackbone:
    """A frozen open_clip model that turns pixels into InCTRL's image and text features."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.spec = spec
        self.device = _resolve_device(spec.device)
        model, self.preprocess, self.tokenizer = _create(spec)
        self.geometry = _geometry(model, spec)
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        if spec.precision == "tf32" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if spec.is_test_only:
            LOG.warning(
                "Using %s: a tiny randomly initialised backbone for tests and offline demos; "
                "its scores say nothing about detection quality.",
                spec.backbone_id,
            )
        LOG.info("Loaded backbone %s on %s (%s): %s", spec.backbone_id, self.device,
                 spec.precision, self.geometry)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.spec.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        """Patch tokens and embeddings for preprocessed images.

        pixels: (batch, 3, H, W) as produced by ``self.preprocess``
        returns ImageFeatures with tokens (batch, layers, patches, token_width) and
        embeds (batch, embed_dim), float32, on the backbone's device
        """
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            out = self.model.visual.forward_intermediates(
                pixels,
                indices=[b - 1 for b in self.geometry.blocks],
                output_fmt="NLC",
                normalize_intermediates=False,
            )
        tokens = torch.stack(out["image_intermediates"], dim=1).float()
        return ImageFeatures(tokens=tokens, embeds=out["image_features"].float())

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (len(texts), embed_dim), float32 on the device.

        Always computed in float32, whatever ``spec.precision``: prompts are encoded once per
        category, so bf16 would save nothing worth having, and the text prior's temperature
        (x100 before the softmax) would amplify bf16's rounding into the scores. The tower
        runs on the prompts' shortest common prefix (``encode_text_prefix``).
        """
        from pipeline.model.text import encode_text_prefix

        tokens = self.tokenizer(list(texts)).to(self.device)
        emb = encode_text_prefix(self.model, tokens)
        return F.normalize(emb.float(), dim=-1)

    def preprocess_batch(self, images: Sequence) -> torch.Tensor:
        """Stack PIL images into a (batch, 3, H, W) tensor with the model's own transform."""
        return torch.stack([self.preprocess(im) for im in images])


_CACHE: dict[BackboneSpec, ClipBackbone] = {}
_CACHE_LOCK = threading.Lock()
_INFO: dict[BackboneSpec, BackboneInfo] = {}


def describe(spec: BackboneSpec) -> BackboneInfo:
    """Geometry, preprocessing and device of a backbone, without loading it (cached)."""
    with _CACHE_LOCK:
        backbone = _CACHE.get(spec)
        if backbone is not None:
            return BackboneInfo(backbone.geometry, backbone.preprocess, backbone.device)
        info = _INFO.get(spec)
        if info is None:
            info = _INFO[spec] = _describe(spec)
        return info


def get_backbone(spec: BackboneSpec) -> ClipBackbone:
    """One backbone per spec per process: heavy state is loaded once and shared."""
    with _CACHE_LOCK:
        backbone = _CACHE.get(spec)
        if backbone is None:
            backbone = _CACHE[spec] = ClipBackbone(spec)
        return backbone


__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_PRETRAINED",
    "TINY_BACKBONE",
    "TINY_PRETRAINED",
    "BackboneInfo",
    "BackboneLoadError",
    "BackboneSpec",
    "ClipBackbone",
    "Geometry",
    "ImageFeatures",
    "default_blocks",
    "describe",
    "get_backbone",
    "register_packaged_configs",
    "tiny_spec",
]


def weights_obtainable(spec: BackboneSpec, timeout_s: float = 3.0) -> bool:
    """Quick check that ``spec``'s weights are cached, local, or the hub answers at all.

    Lets the offline demo fall back at once instead of waiting through download retries.
    """
    if spec.is_random or spec.pretrained.startswith("local-dir:"):
        return True
    if os.path.exists(spec.pretrained):
        return True
    import socket

    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained) or {}
    hub_id = cfg.get("hf_hub", "").rstrip("/")
    if spec.pretrained.startswith("hf-hub:"):
        hub_id = spec.pretrained[len("hf-hub:"):]
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub_id, filename), str):
                return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
