"""The scorers one run compares, the extractors they read, and one seam the job drives.

A run names its scorers (``--scorer inctrl,patchcore``); each reads one extractor, and each
extractor one *view* of the image (its own preprocessing). Everything per scorer and per
extractor comes from their entries (``registry``), so this module knows no scorer by name.

An image is decoded once, preprocessed once per view and run once per extractor; scorers
sharing an extractor read the same forward. The features of one image travel as one
``TensorBundle`` with keys ``<extractor>/<feature>`` (``cnn/s8``, ``clip/tokens``).

``SuiteSpec`` is the plain, hashable description (it is what entries read as ``Models``);
``FeatureSuite`` the loaded extractors (once per worker process); ``build_scorers`` the
scorers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import fsspec
import torch

from pipeline.model.backbone import BackboneSpec
from pipeline.model.checkpoint import CheckpointError, file_hash
from pipeline.model.maps import InputGeometry, Smoothing
from pipeline.model.scorers.base import Features, ScorerEntry
from pipeline.model.scorers.registry import (DEFAULT_SCORERS, extractor_entry, option,
                                             scorer_entry, scorer_names)
from pipeline.model.shared import shared

_SEP = "/"


def parse_scorers(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"inctrl, spade"`` (or a sequence of names) → ``("inctrl", "spade")``: known names,
    each once, in the order given. Raises ValueError naming the choices."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if not name:
            continue
        scorer_entry(name)  # unknown: ValueError naming the choices
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"name at least one scorer ({', '.join(scorer_names())})")
    return tuple(out)


def zero_shot_scorers() -> tuple[str, ...]:
    return tuple(s for s in scorer_names() if scorer_entry(s).min_k == 0)


def check_k(scorers: Iterable[str], k: int) -> None:
    """Refuse, in one message, the scorers that cannot run with ``k`` references."""
    short = [s for s in scorers if scorer_entry(s).min_k > k]
    if not short:
        return
    need = max(scorer_entry(s).min_k for s in short)
    raise ValueError(
        f"{', '.join(short)} cannot score with k={k}: "
        f"{'it needs' if len(short) == 1 else 'they need'} at least {need} normal "
        f"reference image(s) per group. Zero-shot (k=0) scorers: "
        f"{', '.join(zero_shot_scorers())}.")


# --------------------------------------------------------------- features as one bundle


def _owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds its values and nothing else."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.nelement() * t.element_size())


def _joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``: a view where ``_joined_view`` finds one."""
    view = _joined_view(parts)
    return torch.cat(list(parts)) if view is None else view


def _joined_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``torch.cat(parts)`` as a view, when the parts are contiguous and lie back to back, in
    order, in one storage (a batch split into views); None otherwise."""
    first = parts[0]
    if first.dim() == 0:
        return None
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    row = math.prod(first.shape[1:])
    rows = 0
    for part in parts:
        if (not part.is_contiguous() or part.dtype != first.dtype
                or part.device != first.device or part.shape[1:] != first.shape[1:]
                or part.untyped_storage().data_ptr() != storage
                or part.storage_offset() != offset + rows * row):
            return None
        rows += part.shape[0]
    return first.new_empty(0).set_(first.untyped_storage(), offset, (rows, *first.shape[1:]))


@dataclass
class TensorBundle:
    """Named tensors of one image (or a stack of images, batch first), by
    ``<extractor>/<feature>`` key; what travels between the job's stages."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        """Pickled (a runner that pickles elements instead of using TensorBundleCoder), each
        tensor carries its own values alone: torch would pickle a view's whole storage, the
        whole batch for ``split(copy=False)``."""
        return {"tensors": {k: v if _owns_storage(v) else v.clone()
                            for k, v in self.tensors.items()}}

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
        """Stack along the batch; every item has the same keys. Items that are consecutive
        views of one batch (``split(copy=False)``, in order) come back as a view of it, with
        no copy; anything else is concatenated."""
        if not items:
            raise ValueError("nothing to concatenate")
        return TensorBundle({k: _joined([b.tensors[k] for b in items])
                             for k in items[0].tensors})

    def split(self, copy: bool = True) -> list["TensorBundle"]:
        """One bundle per image: each an own copy, or with ``copy=False`` views of this batch
        (each keeps the whole batch's storage alive: only for a consumer that drops them
        batch by batch; a coder writes a view's own values alone)."""
        return [TensorBundle({k: v[i:i + 1].clone() if copy else v[i:i + 1]
                              for k, v in self.tensors.items()})
                for i in range(len(self))]


# --------------------------------------------------------------- the plain description


def _settings(values: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Known setting names with their values, sorted by name (a hashable, canonical form);
    a value equal to the setting's default is left out."""
    pairs = dict(values.items() if isinstance(values, Mapping) else values)
    out = []
    for name, value in sorted(pairs.items()):
        default = option(name).default  # unknown: KeyError naming it
        if isinstance(value, list):
            value = tuple(value)
        if value != default:
            out.append((name, value))
    return tuple(out)


@dataclass(frozen=True)
class SuiteSpec:
    """Which scorers run, on which models: the ``Models`` every entry reads. Hashable (keys
    worker caches).

    ``clip``/``checkpoint``: the run's CLIP model (InCTRL's, WinCLIP's) and InCTRL's heads.
    ``settings``: the extractors' and scorers' own settings (``registry.options()``), by
    name; unnamed ones take their defaults. ``descriptors``: the extractors also return
    what representative reference selection compares (the CNN's pooled feature).
    """

    scorers: tuple[str, ...] = DEFAULT_SCORERS
    clip: BackboneSpec = field(default_factory=BackboneSpec)
    checkpoint: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()
    descriptors: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scorers", parse_scorers(self.scorers))
        try:
            object.__setattr__(self, "settings", _settings(self.settings))
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None

    @classmethod
    def of(cls, scorers: str | Sequence[str] = DEFAULT_SCORERS, clip: BackboneSpec | None = None,
           checkpoint: str | None = None, descriptors: bool = False, **settings: Any
           ) -> "SuiteSpec":
        """``SuiteSpec.of(("patchcore",), cnn_backbone="mobilenet_v2")``."""
        return cls(scorers, clip or BackboneSpec(), checkpoint, tuple(settings.items()),
                   descriptors)

    def setting(self, name: str) -> Any:
        """A setting's value: as given, else its default."""
        for key, value in self.settings:
            if key == name:
                return value
        return option(name).default

    def with_settings(self, **values: Any) -> "SuiteSpec":
        return replace(self, settings=(*self.settings, *values.items()))

    @property
    def device(self) -> str:
        return self.clip.device

    @property
    def precision(self) -> str:
        """The run's ``--precision`` (carried by the CLIP spec, as the device is); every
        extractor computes in it (``pipeline.model.precision``)."""
        return self.clip.precision

    def entry(self, scorer: str) -> ScorerEntry:
        return scorer_entry(scorer)

    @property
    def extractors(self) -> tuple[str, ...]:
        """The extractors the scorers read, each once, in the scorers' order."""
        return tuple(dict.fromkeys(scorer_entry(s).extractor for s in self.scorers))

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(extractor_entry(e).view for e in self.extractors))

    @property
    def needs_text(self) -> bool:
        """Whether any scorer reads the categories' prompt embeddings."""
        return any(scorer_entry(s).needs_text for s in self.scorers)

    @property
    def uses_clip(self) -> bool:
        """Whether the run loads its CLIP model (an extractor runs it, or prompts are
        encoded with it)."""
        return self.needs_text or any(extractor_entry(e).clip_based for e in self.extractors)

    def readers(self, extractor: str) -> tuple[str, ...]:
        return tuple(s for s in self.scorers if scorer_entry(s).extractor == extractor)

    def extractor_spec(self, extractor: str, readers: Sequence[str] | None = None) -> Hashable:
        """The extractor's spec serving ``readers`` (default: every scorer of the run that
        reads it, so one forward serves them all)."""
        names = self.readers(extractor) if readers is None else readers
        return extractor_entry(extractor).spec(
            self, [scorer_entry(s).requirements(self) for s in names])

    def extractor_identity(self, extractor: str) -> str:
        """What an extractor's features in this run depend on (keys caches and choices)."""
        return extractor_entry(extractor).identity(self.extractor_spec(extractor))

    def _own_spec(self, scorer: str) -> Hashable:
        """The spec of the scorer's extractor as the scorer alone needs it: what its rows
        name, whatever else runs beside it."""
        return self.extractor_spec(scorer_entry(scorer).extractor, (scorer,))

    def input_geometry(self, scorer: str, grid: tuple[int, int]) -> InputGeometry:
        """How the scorer's view turns an image into the input its patch map covers."""
        ext = scorer_entry(scorer).extractor
        return extractor_entry(ext).geometry(self.extractor_spec(ext), grid)

    def smoothing(self, scorer: str) -> Smoothing:
        return scorer_entry(scorer).smoothing

    def backbone_of(self, scorer: str) -> tuple[str, str]:
        """(model name, weights) the scorer's features come from, for its output rows."""
        return extractor_entry(scorer_entry(scorer).extractor).model_of(self._own_spec(scorer))

    def components(self) -> tuple[str, ...]:
        """The run's scorers' output components, each once."""
        return tuple(dict.fromkeys(c for s in self.scorers for c in scorer_entry(s).components))

    def check(self, k: int) -> None:
        """Refuse, in one message, what cannot run with ``k`` references or these settings."""
        check_k(self.scorers, k)
        for s in self.scorers:
            scorer_entry(s).check(self, k)

    def checkpoint_hashes(self) -> dict[str, str | None]:
        """Each scorer's checkpoint's content hash (None without one). Reads the files: a
        missing one fails here, before any worker starts."""
        out: dict[str, str | None] = {}
        for s in self.scorers:
            path = scorer_entry(s).checkpoint(self)
            if not path:
                out[s] = None
                continue
            try:
                with fsspec.open(path, "rb") as f:
                    out[s] = file_hash(f.read())
            except FileNotFoundError as exc:
                raise CheckpointError(f"{s}: checkpoint not found: {path}") from exc
        return out

    def model_ids(self, hashes: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """What produced each scorer's rows (``ScorerEntry.identity``), computed once per
        run without loading any model."""
        hashes = self.checkpoint_hashes() if hashes is None else hashes
        out = {}
        for s in self.scorers:
            entry = scorer_entry(s)
            ext = extractor_entry(entry.extractor).identity(self._own_spec(s))
            out[s] = entry.identity(self, ext, hashes.get(s))
        return out

    def identity(self) -> "RunIdentity":
        """Every scorer's model id and checkpoint hash, computed once per run (reads the
        checkpoint files, loads no model)."""
        hashes = self.checkpoint_hashes()
        return RunIdentity(tuple(self.model_ids(hashes).items()), tuple(hashes.items()))

    def modes(self, k: int) -> dict[str, str]:
        return {s: scorer_entry(s).mode(self, k) for s in self.scorers}


@dataclass(frozen=True)
class RunIdentity:
    """What produced each scorer's rows (its ``model_id``) and the content hash of the
    checkpoint it read (None without one); pairs by scorer, in the run's order."""

    model_ids: tuple[tuple[str, str], ...]
    checkpoints: tuple[tuple[str, str | None], ...]

    def model_id(self, scorer: str) -> str:
        return dict(self.model_ids)[scorer]

    def by_scorer(self) -> dict[str, str]:
        return dict(self.model_ids)

    def checkpoint_label(self, scorer: str) -> str | None:
        """The rows' ``heads_hash``: the checkpoint's hash; ``none`` for a scorer that can
        read one and runs without; null for scorers that never read one."""
        digest = dict(self.checkpoints)[scorer]
        if digest:
            return digest
        return "none" if scorer_entry(scorer).trainable else None


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
    for ext in spec.extractors:
        entry = extractor_entry(ext)
        if entry.view not in transforms:
            transforms[entry.view] = entry.preprocess(spec.extractor_spec(ext))
    return ViewPreprocess(transforms)


# --------------------------------------------------------------- the loaded extractors


class FeatureSuite:
    """The run's extractors, loaded once per worker process (``get_feature_suite``)."""

    def __init__(self, spec: SuiteSpec) -> None:
        self.spec = spec
        self.extractors: dict[str, Any] = {
            ext: extractor_entry(ext).load(spec.extractor_spec(ext)) for ext in spec.extractors}
        self._views = {ext: extractor_entry(ext).view for ext in spec.extractors}
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

        out = TensorBundle.join({ext: run(model, views[self._views[ext]])
                                 for ext, model in self.extractors.items()})
        if IMAGE_SIZE in views:
            out.tensors[IMAGE_SIZE] = views[IMAGE_SIZE].to(self.device)
        return out


def get_feature_suite(spec: SuiteSpec) -> FeatureSuite:
    """One FeatureSuite per spec per process (its models are themselves shared per process)."""
    return shared("suite", spec, lambda: FeatureSuite(spec))


# --------------------------------------------------------------- the scorers


def build_scorers(spec: SuiteSpec) -> dict[str, Any]:
    """The run's scorers by name, on the job's device (each entry's ``build``; models they
    load are shared per process)."""
    return {name: scorer_entry(name).build(spec) for name in spec.scorers}
