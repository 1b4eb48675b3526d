"""A frozen DINOv2 ViT (through timm) that turns images into AnomalyDINO's patch features.

The architecture is a timm model name (default ``vit_small_patch14_dinov2.lvd142m``, the
paper's ViT-S/14); the weights are timm's pretrained ones, a local file, or seeded random
weights for tests. Patch size, prefix tokens, width and normalisation constants are read off
the model; the model runs with a dynamic input size, so any multiple of the patch size works.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from pipeline.model.backbone import BackboneLoadError
from pipeline.model.augment import even_angles, rotations
from pipeline.model.scorers.anomalydino import DEFAULT_ROTATIONS, PATCHES, ROTATED
from pipeline.model.scorers.cnn import IMAGENET_MEAN, IMAGENET_STD
from pipeline.model.maps import InputGeometry
from pipeline.model.pixels import host_normalizing
from pipeline.model.precision import (BF16, FP32, module_dtype, module_precision, to_input,
                                      to_precision)
from pipeline.model.scorers.base import (ExtractorEntry, Features, Models, Option,
                                         positive_int)
from pipeline.model.shared import shared
from pipeline.model.weights import file_sha256, is_random, random_seed, seeded, weights_label

LOG = logging.getLogger(__name__)

DEFAULT_DINO = "vit_small_patch14_dinov2.lvd142m"
#: timm's pretrained weights for the model name's tag
TIMM_WEIGHTS = "timm"
#: AnomalyDINO resizes the shorter side of MVTec images to 448 pixels
DEFAULT_IMAGE_SIZE = 448
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class DinoSpec:
    """What to load and where to run it; hashable, it keys the per-process cache.

    ``weights``: ``timm`` (the pretrained weights of ``name``'s tag), another timm tag
    (``lvd142m``), a local file (safetensors, or a torch state dict loaded with
    ``weights_only=True``; timm or original DINOv2 key names), or ``random[:SEED]``.
    ``image_size``: the side images are resized to (``keep_aspect``: the shorter side, as
    the paper does; otherwise both sides, which keeps a batch stackable); either way the
    result is cropped to a multiple of the patch size. ``rotations``: references are also
    extracted at this many angles evenly around the circle (the official 8; 1: none).
    ``overrides``: timm architecture arguments (``(("depth", 2),)``), for tests.
    ``precision``: ``fp32``, or ``bf16`` (the ViT's weights and input in bf16, on a CPU with
    native bf16; ``pipeline.model.precision.module_precision``).
    """

    name: str = DEFAULT_DINO
    weights: str = TIMM_WEIGHTS
    image_size: int = DEFAULT_IMAGE_SIZE
    keep_aspect: bool = False
    device: str = "cpu"
    overrides: tuple[tuple[str, Any], ...] = ()
    rotations: int = DEFAULT_ROTATIONS
    precision: str = FP32

    def __post_init__(self) -> None:
        if self.precision not in (FP32, BF16):
            raise ValueError(f"a DINO ViT computes in {FP32} or {BF16}, got {self.precision!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.rotations < 1:
            raise ValueError(f"rotations must be at least 1, got {self.rotations}")
        if not self.name:
            raise ValueError("a timm model name is needed")
        if self.is_random:
            self.random_seed  # noqa: B018 - validates the seed now, not at load time

    @property
    def is_random(self) -> bool:
        return is_random(self.weights)

    @property
    def random_seed(self) -> int:
        return random_seed(self.weights)

    @property
    def is_file(self) -> bool:
        """Whether ``weights`` names a file (it need not exist; loading says so)."""
        w = self.weights
        return (not self.is_random
                and (os.path.exists(w) or os.sep in w or "/" in w or w.endswith(_FILE_SUFFIXES)))

    @property
    def timm_name(self) -> str:
        """The timm name to create: ``name``, or its architecture with the given tag."""
        if self.weights == TIMM_WEIGHTS or self.is_random or self.is_file:
            return self.name
        return f"{self.name.split('.')[0]}.{self.weights}"


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DINO weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # common wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneLoadError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return state


def _create(spec: DinoSpec) -> tuple[torch.nn.Module, str]:
    """The timm model with its weights, and the weights' id (for ``identity``)."""
    import timm

    kwargs = dict(spec.overrides, num_classes=0, dynamic_img_size=True)
    try:
        if spec.is_random:
            with seeded(spec.random_seed):
                model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
            return model, f"random:{spec.random_seed}"
        if spec.is_file:
            state = _read_state_dict(spec.weights)
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
            from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

            if isinstance(model, VisionTransformer):  # original DINOv2 keys, other grids
                state = checkpoint_filter_fn(state, model)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BackboneLoadError(
                    f"{spec.weights!r} does not fit {spec.name!r}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}")
            return model, f"{Path(spec.weights).name}#sha256={file_sha256(spec.weights)[:12]}"
        model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        return model, spec.timm_name.partition(".")[2] or "timm-default"
    except (BackboneLoadError, FileNotFoundError):
        raise
    except Exception as exc:  # timm and the hub raise many types; one clear message
        raise BackboneLoadError(
            f"could not load DINO backbone {spec.timm_name!r} with weights {spec.weights!r}: "
            f"{exc}. Pretrained weights come from the Hugging Face cache (HF_HOME) or a "
            "download; on an offline machine pass a local weights file.") from exc


class _CropToMultiple:
    """(3, H, W) → its top-left (3, H − H mod p, W − W mod p), as AnomalyDINO crops."""

    def __init__(self, patch: tuple[int, int]) -> None:
        self.patch = patch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return x[..., : h - h % self.patch[0], : w - w % self.patch[1]]


def dino_preprocess(image_size: int, keep_aspect: bool, patch_size: tuple[int, int],
                    mean: tuple[float, ...],
                    std: tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    """AnomalyDINO's transform: bicubic antialiased resize (``keep_aspect``: the shorter side
    to ``image_size``; otherwise both sides), to tensor, normalise, top-left crop to a
    multiple of the patch size. Picklable."""
    from torchvision import transforms as T

    return host_normalizing(T.Compose([
        T.Resize(image_size if keep_aspect else (image_size, image_size),
                 interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.ToTensor(),
        T.Normalize(mean, std),
        _CropToMultiple(patch_size),
    ]))


class DinoExtractor:
    """Frozen DINOv2 ViT → Features {``patches``: (batch, H/p, W/p, width)} (final-norm
    patch tokens, not L2-normalised; prefix tokens dropped), float32; in bf16
    (``spec.precision``) the ViT's weights and input are bf16."""

    def __init__(self, spec: DinoSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackboneLoadError(f"device {spec.device!r} was asked for, but CUDA is not "
                                    "available here")
        self.dtype = module_dtype(self.device, spec.precision)  # refused before loading
        model, weights_id = _create(spec)
        self.model = model.eval().requires_grad_(False).to(self.device)
        to_precision(self.model, self.dtype)
        self.patch_size = tuple(int(p) for p in model.patch_embed.patch_size)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.width = int(model.embed_dim)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        mode = "aspect" if spec.keep_aspect else "square"
        arch = spec.name.split(".")[0]
        extra = "".join(f",{k}={v}" for k, v in spec.overrides)
        self.identity = f"dino:{arch}{extra}@{weights_id}:size={spec.image_size}:{mode}"
        if spec.rotations > 1:
            self.identity += f":rotations={spec.rotations}"
        if spec.precision != FP32:
            self.identity += f":{spec.precision}"
        if spec.is_random:
            LOG.warning("Using %s: random weights, for tests only; its scores say nothing "
                        "about detection quality.", self.identity)
        LOG.info("Loaded DINO extractor %s on %s (patch %s, width %d)", self.identity,
                 self.device, self.patch_size, self.width)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid of a (height, width) input."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """PIL RGB → (3, H, W): bicubic resize, the model's normalisation, crop to patches."""
        return dino_preprocess(self.spec.image_size, self.spec.keep_aspect, self.patch_size,
                               self.mean, self.std)

    @torch.no_grad()
    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W), H and W multiples of the patch size → {patches: (B, h, w, C)},
        float32 on the extractor's device."""
        b, _, height, width = pixels.shape
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size}; use this extractor's preprocess()")
        tokens = self.model.forward_features(to_input(pixels, self.device, self.dtype))
        patches = tokens[:, self.num_prefix_tokens:]
        h, w = self.grid(height, width)
        return {PATCHES: patches.float().reshape(b, h, w, patches.shape[-1])}

    @torch.no_grad()
    def extract_references(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``extract`` plus, with ``spec.rotations`` > 1, ``rotated``: (B, rotations − 1, h, w,
        C) the features of each image turned by the other angles (``augment.rotate``)."""
        feats = self.extract(pixels)
        if self.spec.rotations > 1:
            b = pixels.shape[0]
            turned = rotations(pixels.to(self.device, torch.float32),
                               even_angles(self.spec.rotations)[1:])  # (B, R − 1, 3, H, W)
            extra = self.extract(turned.flatten(0, 1))[PATCHES]
            feats[ROTATED] = extra.view(b, self.spec.rotations - 1, *extra.shape[1:])
        return feats


def get_dino_extractor(spec: DinoSpec) -> DinoExtractor:
    """One extractor per spec per process: the model is loaded once and shared."""
    return shared("dino", spec, lambda: DinoExtractor(spec))


def dino_view_preprocess(spec: DinoSpec) -> Callable[[Any], torch.Tensor]:
    """``get_dino_extractor(spec).preprocess()`` without loading weights: the architecture is
    built on the meta device (no memory, no download) for its patch size and its pretrained
    configuration's normalisation. For decoding workers, which run no model."""
    import timm

    kwargs = dict(spec.overrides, num_classes=0, dynamic_img_size=True)
    try:
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one clear message, as loading gives
        raise BackboneLoadError(f"unknown DINO backbone {spec.timm_name!r}: {exc}") from exc
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch = tuple(int(p) for p in model.patch_embed.patch_size)
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return dino_preprocess(spec.image_size, spec.keep_aspect, patch, tuple(mean), tuple(std))


# --------------------------------------------------------------- the extractor entry

DINO = "dino"


class DinoEntry(ExtractorEntry):
    """A timm DINOv2 ViT for AnomalyDINO; references also at the rotations its readers ask
    for (``requirements``: ``rotations``)."""

    name = DINO
    view = DINO
    options = (
        Option("vit_backbone", DEFAULT_DINO,
               "anomalydino: timm DINOv2 model name (default %(default)s)"),
        Option("vit_weights", TIMM_WEIGHTS,
               "'timm' (the name's pretrained weights, from the Hugging Face cache), another "
               "timm tag, a weights file or 'random[:SEED]' (default %(default)s)"),
        Option("vit_image_size", DEFAULT_IMAGE_SIZE,
               "anomalydino: square input side in pixels (default %(default)s)",
               type=positive_int),
    )

    def spec(self, models: Models, needs: Sequence[Mapping[str, Any]]) -> DinoSpec:
        rotations = max([int(n.get("rotations", 1)) for n in needs] or [1])
        return DinoSpec(models.setting("vit_backbone"), models.setting("vit_weights"),
                        image_size=models.setting("vit_image_size"), device=models.device,
                        rotations=rotations,
                        precision=module_precision(models.device, models.precision))

    def preprocess(self, spec: DinoSpec) -> Callable[[Any], torch.Tensor]:
        return dino_view_preprocess(spec)

    def identity(self, spec: DinoSpec) -> str:
        return (f"dino|{spec.name}|{weights_label(spec.weights)}|{spec.image_size}"
                f"|{spec.keep_aspect}"
                + (f"|rotations={spec.rotations}" if spec.rotations > 1 else "")
                # fp32 adds nothing: the identities of the runs before precision was recorded
                + (f"|precision={spec.precision}" if spec.precision != FP32 else ""))

    def load(self, spec: DinoSpec) -> DinoExtractor:
        return get_dino_extractor(spec)

    def geometry(self, spec: DinoSpec, grid: tuple[int, int]) -> InputGeometry:
        """Resized to a square, then cropped to a multiple of the patch size, top-left."""
        size = spec.image_size
        named = re.search(r"patch(\d+)", spec.name)
        patch = int(named.group(1)) if named else size // grid[0]
        crop = size - size % patch
        return InputGeometry.square(size, crop, crop)

    def descriptor(self, features: Features) -> torch.Tensor:
        """The mean patch token."""
        return features[PATCHES].mean(dim=(1, 2))

    def model_of(self, spec: DinoSpec) -> tuple[str, str]:
        return spec.name, weights_label(spec.weights)

    def augments_references(self, spec: DinoSpec) -> bool:
        return spec.rotations > 1


DINO_ENTRY = DinoEntry()
