"""A thin wrapper around an open_clip CLIP model: loading, geometry and feature extraction.

The wrapper never changes open_clip's code. It loads a model by name and ``pretrained``
source, reads every size it needs from the model's own config, and exposes exactly the
features InCTRL consumes: patch tokens of a few intermediate ViT blocks and the pooled,
projected image embedding; plus text embeddings for the prompt prior.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import tempfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.model.pixels import host_normalizing
from pipeline.model.precision import PRECISIONS, autocast, enable_tf32, module_dtype
from pipeline.model.shared import peek, shared
from pipeline.model.weights import file_sha256, is_random, random_seed, seeded

LOG = logging.getLogger(__name__)

#: ``pipeline.model.shared`` kinds: loaded backbones and their descriptions.
BACKBONES, DESCRIPTIONS = "clip", "clip-description"

DEFAULT_BACKBONE = "ViT-B-16-plus-240"
# InCTRL's engine loads these towers before training and keeps them frozen.
DEFAULT_PRETRAINED = "laion400m_e32"

# The tiny backbone exists for tests and offline demos only: random weights, tiny sizes.
# Its name says so, and the name is part of every model id written to outputs.
TINY_BACKBONE = "InCTRL-Tiny-ViT-TESTONLY"
TINY_PRETRAINED = "random:0"

_CONFIG_DIR = Path(__file__).with_name("configs")
_REGISTER_LOCK = threading.Lock()
_registered = False

# InCTRL reads blocks 7, 9 and 11 (counted from 1) of a 12-block ViT.
_REFERENCE_DEPTH = 12
_REFERENCE_BLOCKS = (7, 9, 11)



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

    ``pretrained`` is an open_clip tag (``laion400m_e32``), a weights file (local or an
    fsspec URL), a ``local-dir:`` or ``hf-hub:`` source, or ``random[:SEED]`` for seeded
    random weights. ``weights_sha256`` (hex, at least 8 digits of the start) is the checksum
    a weights file must have; it is checked before the file is loaded.
    ``blocks`` are 1-based ViT block numbers; empty means InCTRL's relative positions.
    """

    name: str = DEFAULT_BACKBONE
    pretrained: str = DEFAULT_PRETRAINED
    blocks: tuple[int, ...] = ()
    device: str = "cpu"
    precision: str = "fp32"
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if any(b < 1 for b in self.blocks):
            raise ValueError(f"blocks are counted from 1, got {self.blocks}")
        if self.weights_sha256 and not _is_sha256_prefix(self.weights_sha256):
            raise ValueError("weights_sha256 must be 8 to 64 lowercase hex digits, got "
                             f"{self.weights_sha256!r}")

    @property
    def is_random(self) -> bool:
        return is_random(self.pretrained)

    @property
    def random_seed(self) -> int:
        return random_seed(self.pretrained)

    @property
    def is_test_only(self) -> bool:
        return self.name == TINY_BACKBONE

    @property
    def weights_id(self) -> str:
        """The weights, independent of where a weights file lies: a tag as given, a file by
        its name and, where known, the start of its checksum."""
        pretrained = self.pretrained
        if _is_url(pretrained) or self.weights_sha256:
            pretrained = posixpath.basename(pretrained.replace(os.sep, "/").rstrip("/"))
        elif not self.is_random and os.path.exists(pretrained):
            pretrained = Path(pretrained).name
        if self.weights_sha256:
            pretrained += f"#sha256={self.weights_sha256[:12]}"
        return pretrained

    @property
    def backbone_id(self) -> str:
        """Identifies the features: architecture and weights (not device or precision)."""
        return f"{self.name}@{self.weights_id}"

    @property
    def feature_id(self) -> str:
        """What its features depend on: backbone id, blocks and numeric precision (keys the
        feature cache and names InCTRL's features)."""
        blocks = ",".join(map(str, self.blocks)) if self.blocks else "default"
        return f"{self.backbone_id}|blocks={blocks}|precision={self.precision}"


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


# --------------------------------------------------------------------------------------------
# Weights: which file open_clip is given, and the checksum it must have
# --------------------------------------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")
_NAME_CHECKSUM = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def _is_sha256_prefix(text: str) -> bool:
    return 8 <= len(text) <= 64 and set(text) <= _HEX


def _is_url(path: str) -> bool:
    return "://" in path


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # as open_clip normalises its tags


def checksum_in_name(filename: str) -> str:
    """The sha256 prefix a release file name ends with (``...-699c4b84.pt``), or ''."""
    match = _NAME_CHECKSUM.search(filename)
    return match.group(1) if match else ""


@dataclass(frozen=True)
class ReleaseFile:
    """A weights file published under a name that ends with the start of its sha256, as
    open_clip's own releases are (``vit_b_16_plus_240-laion400m_e32-699c4b84.pt``)."""

    url: str

    def __post_init__(self) -> None:
        if not self.sha256:
            raise ValueError(f"{self.url}: the file name carries no sha256 prefix")

    @property
    def filename(self) -> str:
        return posixpath.basename(urllib.parse.urlparse(self.url).path)

    @property
    def sha256(self) -> str:
        return checksum_in_name(self.filename)


# Tags whose open_clip entry loads other weights than its name says. open_clip 3.3 gives
# ViT-B-16-plus-240 'laion400m_e32' the e31 Hugging Face repository as hf_hub, and prefers the
# hub to the release URL, so asking it for e32 loads e31. These tags load the release file
# itself, checked against the checksum its name carries.
_RELEASE_FILES: dict[tuple[str, str], ReleaseFile] = {
    ("ViT-B-16-plus-240", "laion400m_e32"): ReleaseFile(
        "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"
        "vit_b_16_plus_240-laion400m_e32-699c4b84.pt"),
}


def release_file(name: str, tag: str) -> ReleaseFile | None:
    """The release file ``name``/``tag`` loads from instead of open_clip's entry, if any."""
    return _RELEASE_FILES.get((name, _clean_tag(tag)))


def substituted_tag(name: str, tag: str) -> str | None:
    """Another tag of ``name`` whose weights open_clip's entry for ``tag`` would load.

    Hub entries read ``org/<model>.<tag>/``; one that names another of the model's own tags
    loads that tag's weights. None when the entry is consistent (or open_clip has none)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    parts = cfg.get("hf_hub", "").strip("/").split("/")
    if len(parts) < 2:
        return None
    _, dot, hub_tag = parts[1].rpartition(".")
    hub_tag = _clean_tag(hub_tag)
    tags = {_clean_tag(t) for t in open_clip.list_pretrained_tags_by_model(name)}
    return hub_tag if dot and hub_tag != _clean_tag(tag) and hub_tag in tags else None


def known_sha256(name: str, path: str) -> str:
    """The checksum a weights file must have when its name is that of a release of ``name``
    whose name carries one; '' where none is known."""
    import open_clip

    filename = posixpath.basename(path.replace(os.sep, "/"))
    urls = [r.url for (model, _), r in _RELEASE_FILES.items() if model == name]
    urls += [open_clip.get_pretrained_url(name, t)
             for t in open_clip.list_pretrained_tags_by_model(name)]
    for url in urls:
        if url and posixpath.basename(urllib.parse.urlparse(url).path) == filename:
            return checksum_in_name(filename)
    return ""


def verify_weights_file(path: str, expected: str, hint: str = "") -> str:
    """The full sha256 of ``path``; BackboneLoadError unless it starts with ``expected``."""
    digest = file_sha256(path)
    if expected and not digest.startswith(expected.lower()):
        raise BackboneLoadError(
            f"{path} has sha256 {digest[:16]}..., not the expected {expected}...: these are "
            f"not the weights asked for, and they are not loaded{hint}")
    return digest


def weights_cache_dir() -> str:
    """Where downloaded weights files are kept: open_clip's own cache of release files, so a
    file it downloaded is found (and checked) here too."""
    return os.path.expanduser("~/.cache/clip")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _download(url: str, target: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as source, open(target, "wb") as out:
        for chunk in iter(lambda: source.read(1 << 22), b""):
            out.write(chunk)


def _fetch_checked(fetch: Callable[[str], None], target: str, expected: str, what: str) -> str:
    """Fetch into a temporary file beside ``target``; only a file with the expected checksum
    takes ``target``'s name."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=folder, prefix=os.path.basename(target) + ".", suffix=".part")
    os.close(fd)
    try:
        try:
            fetch(part)
        except Exception as exc:  # urllib and fsspec raise many types
            raise BackboneLoadError(
                f"could not fetch {what}: {exc}. On a machine without access, place the file "
                f"at {target}") from exc
        verify_weights_file(part, expected, hint=f" (fetched from {what})")
        os.replace(part, target)
    finally:
        if os.path.exists(part):
            os.remove(part)
    return target


def fetch_release(release: ReleaseFile, cache_dir: str | None = None) -> str:
    """The local path of ``release``: a cached copy whose checksum matches, or a download
    that is checked before it is kept. A cached file that does not match is refused."""
    target = os.path.join(cache_dir or weights_cache_dir(), release.filename)
    if os.path.exists(target):
        verify_weights_file(target, release.sha256,
                            hint=f"; delete {target} to download {release.url} again")
        return target
    if _offline():
        raise BackboneLoadError(f"{release.filename} is not cached and HF_HUB_OFFLINE is set; "
                                f"place {release.url} at {target}")
    LOG.info("Downloading %s to %s", release.url, target)
    return _fetch_checked(lambda part: _download(release.url, part), target, release.sha256,
                          release.url)


def _local_copy(url: str, sha256: str, cache_dir: str | None) -> str:
    """A local copy of a weights file at an fsspec URL (open_clip reads local files only)."""
    import fsspec

    key = sha256[:16] or hashlib.sha256(url.encode()).hexdigest()[:16]
    target = os.path.join(cache_dir or weights_cache_dir(), "remote",
                          f"{key}-{posixpath.basename(url.rstrip('/'))}")
    if sha256 and os.path.exists(target):
        try:
            verify_weights_file(target, sha256)
            return target
        except BackboneLoadError:
            os.remove(target)  # our own cache, keyed by the checksum: fetch it again

    def fetch(part: str) -> None:
        with fsspec.open(url, "rb") as src, open(part, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                out.write(chunk)

    return _fetch_checked(fetch, target, sha256, url)


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _tag_preprocess(name: str, tag: str) -> dict:
    """A tag's own preprocessing (mean, std, ...), as open_clip applies it when it loads the tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    return {f"image_{k}": cfg[k] for k in _PREPROCESS_KEYS if k in cfg}


def resolve_weights(spec: BackboneSpec, cache_dir: str | None = None
                    ) -> tuple[str, str | None, dict]:
    """(model name, pretrained, preprocessing overrides) to hand open_clip for ``spec``.

    Any weights file is local and checked wherever a checksum is known (``weights_sha256``,
    a release file's name); a tag whose open_clip entry would load other weights loads its
    release file, or is refused. Never substitutes weights: every failure is a
    BackboneLoadError."""
    pretrained, expected = spec.pretrained, spec.weights_sha256
    if pretrained.startswith(("local-dir:", "hf-hub:")):
        if expected:
            raise BackboneLoadError(f"a checksum is checked on a weights file; {pretrained!r} "
                                    "is a folder or hub source")
        return pretrained, None, {}  # open_clip takes these as the model name
    release = release_file(spec.name, pretrained)
    if release is not None:
        path = fetch_release(release, cache_dir)
        if expected:
            verify_weights_file(path, expected)
        return spec.name, path, _tag_preprocess(spec.name, pretrained)
    if _is_url(pretrained) or os.path.isfile(pretrained):
        path = _local_copy(pretrained, expected, cache_dir) if _is_url(pretrained) else pretrained
        expected = expected or known_sha256(spec.name, pretrained)
        if expected:
            verify_weights_file(path, expected)
        return spec.name, path, {}
    if expected:
        raise BackboneLoadError(f"a checksum was given for weights file {pretrained!r}, which "
                                "does not exist")
    other = substituted_tag(spec.name, pretrained)
    if other:
        raise BackboneLoadError(
            f"open_clip's entry for {spec.name!r} pretrained={pretrained!r} loads the weights "
            f"of {other!r}; refusing to load other weights than asked for. Pass the right "
            "weights file as pretrained.")
    return spec.name, pretrained, {}


def state_layout(name: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of open_clip model ``name`` with its shape (no weights loaded)."""
    import open_clip

    register_packaged_configs()
    try:
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, load_weights=False,
                                           device="meta")
    except Exception as exc:
        raise BackboneLoadError(f"could not read the config of backbone {name!r}: {exc}") from exc
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _create(spec: BackboneSpec) -> tuple[torch.nn.Module, Callable, Callable]:
    """Build the open_clip model, its inference transform and tokenizer, or explain the failure."""
    import open_clip

    register_packaged_configs()
    try:
        if spec.is_random:
            model_name = spec.name
            with seeded(spec.random_seed):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None, load_weights=False
                )
        else:
            model_name, pretrained, overrides = resolve_weights(spec)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, **overrides
            )
        tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = host_normalizing(preprocess)
    except BackboneLoadError:
        raise
    except Exception as exc:  # open_clip raises many types; the user needs one clear message
        raise BackboneLoadError(
            f"could not load backbone {spec.name!r} with pretrained={spec.pretrained!r}: {exc}. "
            "Weights come from the Hugging Face cache (HF_HOME), open_clip's cache "
            f"({weights_cache_dir()}) or a download; on an offline machine pre-fetch them, or "
            "pass a local weights file, 'local-dir:DIR' or 'hf-hub:ORG/REPO' as --pretrained."
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
        overrides = _tag_preprocess(spec.name, pretrained)
    try:
        with torch.device("meta"):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None, load_weights=False, device="meta", **overrides)
    except Exception as exc:
        raise BackboneLoadError(f"could not read the config of backbone {spec.name!r}: {exc}") from exc
    return BackboneInfo(_geometry(model, spec), host_normalizing(preprocess),
                        _resolve_device(spec.device))


class ClipBackbone:
    """A frozen open_clip model that turns pixels into InCTRL's image and text features."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.spec = spec
        self.device = _resolve_device(spec.device)
        self.image_dtype = module_dtype(self.device, spec.precision)  # refused before loading
        model, self.preprocess, self.tokenizer = _create(spec)
        self.geometry = _geometry(model, spec)
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        # bf16 on the CPU: the image tower's own weights become bf16, in place (the text tower
        # is a separate module and keeps fp32; no fp32 copy of the image tower is kept, since
        # nothing in a bf16 process reads it in fp32: the spec, precision included, keys the
        # per-process model cache). ViT-B-16-plus-240's image tower shrinks from 0.4 to 0.2 GB.
        self.model.visual.to(self.image_dtype)
        enable_tf32(self.device, spec.precision)
        if spec.is_test_only:
            LOG.warning(
                "Using %s: a tiny randomly initialised backbone for tests and offline demos; "
                "its scores say nothing about detection quality.",
                spec.backbone_id,
            )
        LOG.info("Loaded backbone %s on %s (%s): %s", spec.backbone_id, self.device,
                 spec.precision, self.geometry)

    def image_forward(self) -> contextlib.AbstractContextManager:
        """The context the image tower runs in: bf16 autocast on a GPU for a bf16 run,
        nothing otherwise (on the CPU the tower itself is bf16, ``image_dtype``)."""
        return autocast(self.device, self.spec.precision)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        """Patch tokens and embeddings for preprocessed images.

        pixels: (batch, 3, H, W) as produced by ``self.preprocess``
        returns ImageFeatures with tokens (batch, layers, patches, token_width) and
        embeds (batch, embed_dim), float32, on the backbone's device
        """
        pixels = pixels.to(self.device, self.image_dtype, non_blocking=True)
        with self.image_forward():
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


def describe(spec: BackboneSpec) -> BackboneInfo:
    """Geometry, preprocessing and device of a backbone, without loading it (cached)."""
    backbone = peek(BACKBONES, spec)
    if backbone is not None:
        return BackboneInfo(backbone.geometry, backbone.preprocess, backbone.device)
    return shared(DESCRIPTIONS, spec, lambda: _describe(spec))


def get_backbone(spec: BackboneSpec) -> ClipBackbone:
    """One backbone per spec per process: heavy state is loaded once and shared."""
    return shared(BACKBONES, spec, lambda: ClipBackbone(spec))


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
    "ReleaseFile",
    "checksum_in_name",
    "default_blocks",
    "describe",
    "fetch_release",
    "get_backbone",
    "known_sha256",
    "register_packaged_configs",
    "release_file",
    "resolve_weights",
    "state_layout",
    "substituted_tag",
    "tiny_spec",
    "verify_weights_file",
    "weights_cache_dir",
    "weights_obtainable",
]


def _reachable(host: str, timeout_s: float) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def weights_obtainable(spec: BackboneSpec, timeout_s: float = 3.0) -> bool:
    """Quick check that ``spec``'s weights are cached, local, or their server answers at all.

    Lets the offline demo fall back at once instead of waiting through download retries.
    (Whether cached weights are the right ones is checked when they are loaded.)
    """
    if spec.is_random or spec.pretrained.startswith("local-dir:"):
        return True
    if _is_url(spec.pretrained) or os.path.exists(spec.pretrained):
        return True
    release = release_file(spec.name, spec.pretrained)
    if release is not None:
        if os.path.isfile(os.path.join(weights_cache_dir(), release.filename)):
            return True
        return not _offline() and _reachable(urllib.parse.urlparse(release.url).hostname or "",
                                             timeout_s)
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
    return not _offline() and _reachable("huggingface.co", timeout_s)
