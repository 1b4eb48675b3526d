"""The seam every scorer and feature extractor implements (pure torch), and the entries
through which the job knows them (``registry``).

Features travel as ``Features``: a dict of tensors that all have the batch first, so the job
can batch, move, cache and stack them without knowing what they are. An extractor turns
preprocessed pixels into Features once per image; several scorers may read the same
extractor's Features (one forward per backbone). A scorer builds a normal memory from the k
references of a group once, then scores query batches against it.

The job never branches on a scorer's or an extractor's name: what it needs to know (the
view transform, identity, geometry, descriptor and loading of an extractor; the extractor,
minimum k, settings, text and checkpoint needs, output components and map smoothing of a
scorer) it asks their entries (``ExtractorEntry``, ``ScorerEntry``). Adding a scorer is one
module with its entry, one line in ``registry.BUILTIN`` (or ``registry.register``) and its
tests.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import torch

from pipeline.model.maps import DEFAULT_SMOOTHING, InputGeometry, Smoothing

#: name → (batch, ...) tensor; every value has the same batch size.
Features = Mapping[str, torch.Tensor]

#: ``scoring_mode`` values: trained weights read (InCTRL's heads, a RegAD or CoOp
#: checkpoint), none, or k = 0 (no references).
TRAINING_FREE = "training-free"
WITH_HEADS = "inctrl-heads"
TRAINED = "trained"
ZERO_SHOT = "zero-shot"
#: the context key of the (2, embed_dim) normal / anomalous prompt embeddings of a category
TEXT = "text"
#: the context key of the category a memory is built for
CATEGORY = "category"


def batch_size(features: Features) -> int:
    sizes = {v.shape[0] for v in features.values()}
    if len(sizes) != 1:
        raise ValueError(f"features disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


@dataclass
class ScorerOutput:
    """What a scorer says about a batch of B queries.

    score:      (B,) image anomaly score, larger = more anomalous
    patch_map:  (B, h, w) anomaly map on the scorer's feature grid (upsampled later), or
                None where the scorer has none (InCTRL zero-shot)
    components: name → (B,) further scores worth reporting (may be empty)
    """

    score: torch.Tensor
    patch_map: torch.Tensor | None
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class FeatureExtractor(Protocol):
    """Turns preprocessed images into Features; loaded once per worker, frozen. An extractor
    whose scorers enlarge their memory with transformed references also has
    ``extract_references(pixels)``: the same Features plus those of the transforms."""

    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) → Features on the extractor's device."""


class Scorer(Protocol):
    """A few-shot (or zero-shot) anomaly scorer."""

    def build_memory(self, references: Features, context: Mapping[str, Any] | None = None) -> Any:
        """The normal memory of one group from its k references (k = batch of ``references``),
        built once per (dataset, category, seed). ``context`` carries per-category inputs:
        ``TEXT`` (the prompt pair, for scorers that read text) and ``CATEGORY``."""

    def score(self, queries: Features, memory: Any) -> ScorerOutput:
        """Score a batch of queries against a memory from ``build_memory``."""


# --------------------------------------------------------------- settings and entries


@dataclass(frozen=True)
class Option:
    """One setting of an extractor or a scorer, given as the flag ``--<name with dashes>``.

    ``type`` turns the flag's text into the value (an argparse type: it raises
    ``argparse.ArgumentTypeError`` or ``ValueError`` for a bad value); values must be
    hashable. ``default`` is the value when the flag is not given."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class Models(Protocol):
    """What entries read of a run (``suite.SuiteSpec``): the scorers, InCTRL's CLIP model
    and heads, the device and numeric precision, whether reference descriptors are needed,
    and the settings."""

    scorers: tuple[str, ...]
    checkpoint: str | None
    descriptors: bool

    @property
    def clip(self) -> Any: ...

    @property
    def device(self) -> str: ...

    @property
    def precision(self) -> str: ...

    def setting(self, name: str) -> Any: ...


class ExtractorEntry:
    """What the job knows of one kind of feature extractor, without loading it.

    ``view``: the name of the image transform it reads; extractors with the same view share
    one preprocessed tensor per image (WinCLIP's windows and InCTRL's tokens both read the
    CLIP view). ``spec`` is hashable and keys per-process model caches; ``needs`` are the
    ``requirements`` of the run's scorers that read this extractor."""

    name: str = ""
    view: str = ""
    options: tuple[Option, ...] = ()
    #: it runs the run's CLIP model (``Models.clip``): a run without such an extractor and
    #: without scorers that read text never loads CLIP
    clip_based: bool = False

    def spec(self, models: Models, needs: Sequence[Mapping[str, Any]]) -> Hashable:
        raise NotImplementedError

    def preprocess(self, spec: Hashable) -> Callable[[Any], torch.Tensor]:
        """PIL image → (3, H, W): the view's transform, without loading weights."""
        raise NotImplementedError

    def identity(self, spec: Hashable) -> str:
        """Everything the features depend on (architecture, weights, layers, input size),
        without loading the model; keys feature caches and names rows' models."""
        raise NotImplementedError

    def load(self, spec: Hashable) -> FeatureExtractor:
        """The loaded extractor, once per process (``pipeline.model.shared``)."""
        raise NotImplementedError

    def geometry(self, spec: Hashable, grid: tuple[int, int]) -> InputGeometry:
        """How the view turns an image into the input a patch map on ``grid`` covers."""
        raise NotImplementedError

    def descriptor(self, features: Features) -> torch.Tensor:
        """One vector per image, (n, d), for representative reference selection."""
        raise NotImplementedError

    def model_of(self, spec: Hashable) -> tuple[str, str]:
        """(model name, weights) as rows record them (a file by name and checksum)."""
        raise NotImplementedError

    def augments_references(self, spec: Hashable) -> bool:
        """Whether its ``extract_references`` adds features of transformed references."""
        return False


class ScorerEntry:
    """What the job knows of one scorer.

    extractor:  the ExtractorEntry name whose Features it reads
    min_k:      the smallest k it scores with (0: it can score zero-shot)
    needs_text: its memory reads the category's prompt embeddings (``context[TEXT]``)
    options:    its own settings (flags)
    components: ScorerOutput components written as ``<name>_score`` columns
    smoothing:  how its anomaly maps are smoothed
    trainable:  it can read a trained checkpoint (its rows' ``heads_hash`` says ``none``
                when it runs without one)
    """

    name: str = ""
    extractor: str = ""
    min_k: int = 1
    needs_text: bool = False
    trainable: bool = False
    options: tuple[Option, ...] = ()
    components: tuple[str, ...] = ()
    smoothing: Smoothing = DEFAULT_SMOOTHING

    def requirements(self, models: Models) -> Mapping[str, Any]:
        """What it needs of its extractor's spec (``cnn``: strides, pooled)."""
        return {}

    def build(self, models: Models) -> Scorer:
        """The scorer object, on the run's device; called once per worker."""
        raise NotImplementedError

    def checkpoint(self, models: Models) -> str | None:
        """The trained file it reads, if any (hashed into its rows' identity)."""
        return None

    def check(self, models: Models, k: int) -> None:
        """Raise ValueError, one line saying what to do, for settings it cannot run with
        (checked before a run starts; loads nothing)."""

    def mode(self, models: Models, k: int) -> str:
        """Its rows' ``scoring_mode``."""
        if k == 0:
            return ZERO_SHOT
        return TRAINED if self.checkpoint(models) else TRAINING_FREE

    def identity(self, models: Models, extractor_identity: str, checkpoint_hash: str | None
                 ) -> str:
        """What produced its rows: the scorer with its settings, the features it read and
        the checkpoint's hash. Written to every row as ``model_id``."""
        settings = ",".join(f"{o.name}={models.setting(o.name)}" for o in self.options)
        text = f"{self.name}[{settings}]" if settings else self.name
        text += f"|{extractor_identity}"
        return text + (f"|checkpoint={checkpoint_hash}" if checkpoint_hash else "")


# --------------------------------------------------------------- option value parsers
# argparse types for Option.type: a bad value is one usage line naming the flag.


def name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names in order, each once (``layer2,layer3``)."""
    return tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value
