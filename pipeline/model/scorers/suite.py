"""The scorers one run compares, the extractors they read, and one seam the job drives.

A run names its scorers (``inctrl,spade,padim,patchcore,winclip,anomalydino``). Each reads
one extractor, and each extractor one *view* of the image (its own preprocessing):

    scorer        extractor   view   model
    inctrl        clip        clip   open_clip CLIP (tokens of a few blocks, embedding)
    winclip       windows     clip   the same CLIP model, run on multi-scale windows
    spade         cnn         cnn    a torchvision CNN (maps by stride, pooled feature)
    padim         cnn         cnn      "   one forward for the three CNN scorers
    patchcore     cnn         cnn      "
    anomalydino   dino        dino   a timm DINOv2 ViT (patch tokens)

So an image is decoded once, preprocessed once per view, run once per extractor; scorers
sharing an extractor read the same forward. The features of one image travel as one
``TensorBundle`` with keys ``<extractor>/<feature>`` (``cnn/s8``, ``clip/tokens``).

``SuiteSpec`` is the plain, hashable description; ``FeatureSuite`` the loaded extractors
(once per worker process); ``build_scorers`` the scorers behind ``base.Scorer``, InCTRL
included through ``InctrlScorer``.
"""
from __future__ import annotations

import functools
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from pipeline.model.backbone import BackboneSpec, ImageFeatures, describe, get_backbone
from pipeline.model.inctrl import InCTRLScorer, ReferenceSet
from pipeline.model.loading import get_scorer
from pipeline.model.maps import DEFAULT_SMOOTHING, InputGeometry, Smoothing
from pipeline.model.weights import file_sha256
from pipeline.model.residual import text_prior
from pipeline.model.scorers.anomalydino import CATEGORY, DEFAULT_ROTATIONS, AnomalyDinoScorer
from pipeline.model.scorers.base import Features, ScorerOutput
from pipeline.model.scorers.cnn import (DEFAULT_CNN_BACKBONE, DEFAULT_CNN_WEIGHTS, CnnSpec,
                                        cnn_preprocess, get_cnn_extractor, required_features)
from pipeline.model.scorers.dino import (DEFAULT_DINO,
                                         DEFAULT_IMAGE_SIZE as DEFAULT_VIT_IMAGE_SIZE,
                                         TIMM_WEIGHTS, DinoSpec, dino_view_preprocess,
                                         get_dino_extractor)
from pipeline.model.scorers.padim import SAMPLE, Padim, paper_features
from pipeline.model.scorers.patchcore import MEAN, PatchCore
from pipeline.model.scorers.spade import Spade
from pipeline.model.scorers.winclip import (DEFAULT_SCALES, TEXT, WinClipExtractor, WinClipScorer,
                                            WindowLayout, as_scale)

INCTRL, SPADE, PADIM, PATCHCORE, WINCLIP, ANOMALYDINO = (
    "inctrl", "spade", "padim", "patchcore", "winclip", "anomalydino")
#: Every scorer, in the order tables show them.
SCORERS: tuple[str, ...] = (INCTRL, SPADE, PADIM, PATCHCORE, WINCLIP, ANOMALYDINO)
DEFAULT_SCORERS: tuple[str, ...] = (INCTRL,)

CLIP, WINDOWS, CNN, DINO = "clip", "windows", "cnn", "dino"
EXTRACTOR_OF = {INCTRL: CLIP, WINCLIP: WINDOWS, SPADE: CNN, PADIM: CNN, PATCHCORE: CNN,
                ANOMALYDINO: DINO}
VIEW_OF = {CLIP: CLIP, WINDOWS: CLIP, CNN: CNN, DINO: DINO}
#: The smallest k each scorer works with: 0 means it can score zero-shot.
MIN_K = {INCTRL: 0, WINCLIP: 0, SPADE: 1, PADIM: 1, PATCHCORE: 1, ANOMALYDINO: 1}
_CNN_SCORERS = (SPADE, PADIM, PATCHCORE)
_SEP = "/"


def parse_scorers(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"inctrl, spade"`` (or a sequence of names) → ``("inctrl", "spade")``: known names,
    each once, in the order given. Raises ValueError naming the choices."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"name at least one scorer ({', '.join(SCORERS)})")
    return tuple(out)


def check_k(scorers: Iterable[str], k: int) -> None:
    """Refuse, in one message, the scorers that cannot run with ``k`` references."""
    short = [s for s in scorers if MIN_K[s] > k]
    if not short:
        return
    zero_shot = [s for s in SCORERS if MIN_K[s] == 0]
    raise ValueError(
        f"{', '.join(short)} cannot score with k={k}: "
        f"{'it needs' if len(short) == 1 else 'they need'} at least "
        f"{max(MIN_K[s] for s in short)} normal reference image(s) per group. "
        f"Zero-shot (k=0) scorers: {', '.join(zero_shot)}.")


# --------------------------------------------------------------- features as one bundle


@dataclass
class TensorBundle:
    """Named tensors of one image (or a stack of images, batch first), by
    ``<extractor>/<feature>`` key; what travels between the job's stages."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def to(self, device: torch.device | str) -> "TensorBundle":
        return TensorBundle({k: v.to(device) for k, v in self.tensors.items()})

    def part(self, extractor: str) -> dict[str, torch.Tensor]:
        """One extractor's Features, its prefix removed."""
        prefix = extractor + _SEP
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @staticmethod
    def join(parts: Mapping[str, Features]) -> "TensorBundle":
        """{extractor: Features} → one bundle."""
        return TensorBundle({f"{ext}{_SEP}{k}": v for ext, feats in parts.items()
                             for k, v in feats.items()})

    @staticmethod
    def cat(items: Sequence["TensorBundle"]) -> "TensorBundle":
        """Stack along the batch; every item has the same keys."""
        if not items:
            raise ValueError("nothing to concatenate")
        return TensorBundle({k: torch.cat([b.tensors[k] for b in items])
                             for k in items[0].tensors})

    def split(self) -> list["TensorBundle"]:
        """One bundle per image, each an own copy (a view would carry the batch's storage)."""
        return [TensorBundle({k: v[i:i + 1].clone() for k, v in self.tensors.items()})
                for i in range(len(self))]


def clip_bundle(features: ImageFeatures) -> TensorBundle:
    """InCTRL's ImageFeatures as the ``clip`` part of a bundle."""
    return TensorBundle.join({CLIP: {"tokens": features.tokens, "embeds": features.embeds}})


def clip_features(bundle: TensorBundle) -> ImageFeatures:
    part = bundle.part(CLIP)
    return ImageFeatures(part["tokens"], part["embeds"])


# --------------------------------------------------------------- the plain description


@dataclass(frozen=True)
class SuiteSpec:
    """Which scorers run, on which backbones and weights. Hashable (keys worker caches).

    ``clip``/``checkpoint``: InCTRL's and WinCLIP's CLIP model and InCTRL's heads.
    ``cnn_backbone``/``cnn_weights``: a torchvision classification model and its weights
    (a torchvision weights name, a state-dict file or ``random[:SEED]``), for SPADE, PaDiM
    and PatchCore. ``vit_backbone``/``vit_weights``: AnomalyDINO's timm DINOv2 and its
    weights (``timm``, a tag, a file or ``random[:SEED]``), run on ``vit_image_size``
    square inputs (the paper's 448). ``coreset_ratio``: PatchCore's
    greedy coreset (None keeps every reference patch, the few-shot default).
    """

    scorers: tuple[str, ...] = DEFAULT_SCORERS
    clip: BackboneSpec = field(default_factory=BackboneSpec)
    checkpoint: str | None = None
    cnn_backbone: str = DEFAULT_CNN_BACKBONE
    cnn_weights: str = DEFAULT_CNN_WEIGHTS
    vit_backbone: str = DEFAULT_DINO
    vit_weights: str = TIMM_WEIGHTS
    vit_image_size: int = DEFAULT_VIT_IMAGE_SIZE
    coreset_ratio: float | None = None
    winclip_scales: tuple[tuple[int, int], ...] = DEFAULT_SCALES
    cnn_stages: tuple[str, ...] = ()
    padim_covariance: str = SAMPLE
    anomalydino_rotations: int = DEFAULT_ROTATIONS
    anomalydino_masking: str = "auto"
    patchcore_aggregation: str = MEAN

    def __post_init__(self) -> None:
        object.__setattr__(self, "scorers", parse_scorers(self.scorers))
        object.__setattr__(self, "winclip_scales",
                           tuple(as_scale(s) for s in self.winclip_scales))
        if self.coreset_ratio is not None and not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")

    @property
    def extractors(self) -> tuple[str, ...]:
        """The extractors the scorers read, each once, in the scorers' order."""
        return tuple(dict.fromkeys(EXTRACTOR_OF[s] for s in self.scorers))

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(VIEW_OF[e] for e in self.extractors))

    @property
    def device(self) -> str:
        return self.clip.device

    def cnn_spec(self) -> CnnSpec:
        """The CNN extractor that serves every CNN scorer of the run with one forward."""
        strides, pooled = required_features(_cnn_scorer(s, self) for s in self.scorers
                                            if s in _CNN_SCORERS)
        return CnnSpec(self.cnn_backbone, self.cnn_weights, strides=strides,
                       stages=self.cnn_stages, pooled=pooled, device=self.clip.device)

    def dino_spec(self) -> DinoSpec:
        return DinoSpec(self.vit_backbone, self.vit_weights, image_size=self.vit_image_size,
                        device=self.clip.device, rotations=self.anomalydino_rotations)

    def input_geometry(self, scorer: str, grid: tuple[int, int]) -> InputGeometry:
        """How the scorer's view turns an image into the model input its patch map (on a
        ``grid``) covers: CLIP's and the CNN's resize the shorter side and center-crop;
        DINO's resize to a square and crop to a multiple of the patch size, top-left."""
        ext = EXTRACTOR_OF[scorer]
        if ext == CNN:
            cnn = self.cnn_spec()
            return InputGeometry.center_crop(cnn.resize, cnn.image_size)
        if ext == DINO:
            size = self.vit_image_size
            named = re.search(r"patch(\d+)", self.vit_backbone)
            patch = int(named.group(1)) if named else size // grid[0]
            crop = size - size % patch
            return InputGeometry.square(size, crop, crop)
        side = describe(self.clip).geometry.image_size
        return InputGeometry.center_crop(side[0], side)

    def extractor_identity(self, ext: str) -> str:
        """What an extractor's features depend on, without loading it (keys cached choices)."""
        if ext in (CLIP, WINDOWS):
            c = self.clip
            return f"{ext}|{c.backbone_id}|blocks={c.blocks}|{c.precision}"
        if ext == CNN:
            c = self.cnn_spec()
            return (f"cnn|{c.backbone}|{_weights_label(c.weights)}|{c.strides}|pooled={c.pooled}"
                    f"|{c.resize}/{c.image_size}" + (f"|stages={c.stages}" if c.stages else ""))
        d = self.dino_spec()
        return (f"dino|{d.name}|{_weights_label(d.weights)}|{d.image_size}|{d.keep_aspect}"
                + (f"|rotations={d.rotations}" if d.rotations > 1 else ""))

    def smoothing(self, scorer: str) -> Smoothing:
        """How the scorer's anomaly maps are smoothed (its class says; default σ = 4 px)."""
        return getattr(_SCORER_CLASSES[scorer], "smoothing", DEFAULT_SMOOTHING)

    def backbone_of(self, scorer: str) -> tuple[str, str]:
        """(model name, weights) a scorer's features come from, for its output rows: a
        weights file is named by its file name and checksum (not its host's path)."""
        ext = EXTRACTOR_OF[scorer]
        if ext == CNN:
            return self.cnn_backbone, _weights_label(self.cnn_weights)
        if ext == DINO:
            return self.vit_backbone, _weights_label(self.vit_weights)
        return self.clip.name, self.clip.weights_id


@functools.lru_cache(maxsize=16)
def _weights_label(weights: str) -> str:
    """A weights flag as rows record it: a file as ``name#sha256=<12 hex>``, else as given."""
    if os.path.isfile(weights):
        return f"{os.path.basename(weights)}#sha256={file_sha256(weights)[:12]}"
    return weights


def _cnn_scorer(name: str, spec: SuiteSpec) -> Any:
    if name == SPADE:
        return Spade()
    if name == PADIM:
        return Padim(n_features=paper_features(spec.cnn_backbone),
                     covariance=spec.padim_covariance)
    return PatchCore(coreset_ratio=spec.coreset_ratio, aggregation=spec.patchcore_aggregation)


# --------------------------------------------------------------- preprocessing, per view


#: The bundle key of an image's own (height, width), beside its views and features.
IMAGE_SIZE = "image/size"


class ViewPreprocess:
    """PIL image → TensorBundle {view: (3, H, W), IMAGE_SIZE: (2,) the decoded image's
    (height, width)}: each view's own transform of one decode."""

    def __init__(self, transforms: Mapping[str, Callable[[Any], torch.Tensor]]) -> None:
        self._transforms = dict(transforms)

    def __call__(self, image: Any) -> TensorBundle:
        views = {view: t(image) for view, t in self._transforms.items()}
        views[IMAGE_SIZE] = torch.tensor([image.height, image.width])
        return TensorBundle(views)


def suite_preprocess(spec: SuiteSpec) -> ViewPreprocess:
    """The views' transforms, known without loading a model (decoding workers hold none)."""
    transforms: dict[str, Callable] = {}
    for view in spec.views:
        if view == CLIP:
            transforms[view] = describe(spec.clip).preprocess
        elif view == CNN:
            transforms[view] = cnn_preprocess(spec.cnn_spec())
        else:
            transforms[view] = dino_view_preprocess(spec.dino_spec())
    return ViewPreprocess(transforms)


# --------------------------------------------------------------- the loaded extractors


class _ClipExtractor:
    """InCTRL's features: ``tokens`` (B, layers, patches, width), ``embeds`` (B, embed_dim)."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.backbone = get_backbone(spec)
        self.identity = spec.backbone_id

    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.encode_images(pixels)
        return {"tokens": feats.tokens, "embeds": feats.embeds}


class FeatureSuite:
    """The run's extractors, loaded once per worker process (``get_feature_suite``)."""

    def __init__(self, spec: SuiteSpec) -> None:
        self.spec = spec
        self.extractors: dict[str, Any] = {}
        for ext in spec.extractors:
            if ext == CLIP:
                self.extractors[ext] = _ClipExtractor(spec.clip)
            elif ext == WINDOWS:
                self.extractors[ext] = WinClipExtractor(get_backbone(spec.clip),
                                                        spec.winclip_scales)
            elif ext == CNN:
                self.extractors[ext] = get_cnn_extractor(spec.cnn_spec())
            else:
                self.extractors[ext] = get_dino_extractor(spec.dino_spec())
        self.device = torch.device(spec.device)

    def extract(self, views: Mapping[str, torch.Tensor], references: bool = False) -> TensorBundle:
        """{view: (B, 3, H, W)} → the bundle of every extractor's Features (batch B), on the
        device, and the images' sizes when ``views`` has them. Each extractor runs once on
        its view; with ``references``, an extractor that augments references
        (``extract_references``, e.g. DINO's rotations) adds their features."""
        def run(model: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            if references and hasattr(model, "extract_references"):
                return model.extract_references(pixels)
            return model.extract(pixels)

        out = TensorBundle.join({
            ext: run(model, views[VIEW_OF[ext]]) for ext, model in self.extractors.items()})
        if IMAGE_SIZE in views:
            out.tensors[IMAGE_SIZE] = views[IMAGE_SIZE].to(self.device)
        return out


_SUITES: dict[SuiteSpec, FeatureSuite] = {}
_LOCK = threading.Lock()


def get_feature_suite(spec: SuiteSpec) -> FeatureSuite:
    """One FeatureSuite per spec per process (its models are themselves shared per process)."""
    with _LOCK:
        suite = _SUITES.get(spec)
        if suite is None:
            suite = _SUITES[spec] = FeatureSuite(spec)
        return suite


# --------------------------------------------------------------- the scorers


@dataclass
class InctrlMemory:
    """A group's InCTRL state: its prepared references (None at k = 0) and text features."""

    refs: ReferenceSet | None
    text: torch.Tensor  # (2, embed_dim)


#: InCTRL's components, as the scores table names them (without ``_score``).
INCTRL_COMPONENTS = ("fine", "holistic", "image_residual", "text_prior")


class InctrlScorer:
    """InCTRL behind the scorer seam. With k ≥ 1 exactly ``InCTRLScorer``'s forward (the
    final score with heads, the fine patch residual without); with k = 0 the text prior
    alone (zero-shot), which has no patch map."""

    name = INCTRL
    min_k = 0

    def __init__(self, model: InCTRLScorer, grid: tuple[int, int]) -> None:
        self.model = model
        self.grid = grid

    @property
    def has_heads(self) -> bool:
        return self.model.has_heads

    def build_memory(self, references: Features,
                     context: Mapping[str, Any] | None = None) -> InctrlMemory:
        if not context or TEXT not in context:
            raise ValueError(f"inctrl needs the category's prompt embeddings as "
                             f"context[{TEXT!r}]")
        refs = None
        if references and references["tokens"].shape[0] > 0:
            refs = self.model.prepare_references(
                ImageFeatures(references["tokens"], references["embeds"]))
        return InctrlMemory(refs, context[TEXT])

    def score(self, queries: Features, memory: InctrlMemory) -> ScorerOutput:
        feats = ImageFeatures(queries["tokens"], queries["embeds"])
        if memory.refs is None:
            prior = text_prior(feats.embeds, memory.text)
            nan = torch.full_like(prior, float("nan"))
            return ScorerOutput(score=prior, patch_map=None, components={
                "fine": nan, "holistic": nan, "image_residual": nan, "text_prior": prior})
        comps = self.model(feats, memory.refs, memory.text)
        return ScorerOutput(
            score=comps.final, patch_map=comps.patch_map.view(-1, *self.grid),
            components={name: getattr(comps, name) for name in INCTRL_COMPONENTS})


_SCORER_CLASSES = {INCTRL: InctrlScorer, SPADE: Spade, PADIM: Padim, PATCHCORE: PatchCore,
                   WINCLIP: WinClipScorer, ANOMALYDINO: AnomalyDinoScorer}


def build_scorers(spec: SuiteSpec) -> tuple[dict[str, Any], str]:
    """The run's scorers by name, on the job's device, and InCTRL's heads hash (the empty
    string when InCTRL is not among them). Cheap, except InCTRL's heads (loaded once per
    process by ``get_scorer``)."""
    scorers: dict[str, Any] = {}
    heads = ""
    for name in spec.scorers:
        if name == INCTRL:
            model, heads = get_scorer(spec.clip, spec.checkpoint)
            scorers[name] = InctrlScorer(model, describe(spec.clip).geometry.grid)
        elif name == WINCLIP:
            grid = describe(spec.clip).geometry.grid
            scorers[name] = WinClipScorer(WindowLayout(grid, spec.winclip_scales))
        elif name == ANOMALYDINO:
            scorers[name] = AnomalyDinoScorer(masking=spec.anomalydino_masking)
        else:
            scorers[name] = _cnn_scorer(name, spec)
    return scorers, heads
