"""The training job's configuration: one frozen dataclass (built from flags by
``pipeline.cli.train``) read everywhere."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.config import DEFAULT_K
from pipeline.core.images import ImageLimits
from pipeline.core.layout import feature_cache_dir
from pipeline.model.backbone import BackboneSpec
from pipeline.model.prompts import DEFAULT_SEMANTIC_CLASSES

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. ``feature_cache`` defaults to ``<output>/_feature_cache``
    (the nightly job's default folder name too)."""

    manifest: str
    output: str
    k: int = DEFAULT_K
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    validate_manifest: str | None = None
    feature_cache: str | None = None
    extract_batch_size: int = 32
    semantic_classes: frozenset[str] = DEFAULT_SEMANTIC_CLASSES
    feature_memory_mb: int = 512
    log_every: int = 20
    limits: ImageLimits = ImageLimits()

    def __post_init__(self) -> None:
        for name in ("k", "epochs", "steps_per_epoch", "extract_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError("batch size must be even and at least 2 (half normal, half "
                             f"anomalous queries), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be non-negative, got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.feature_memory_mb < 0:
            raise ValueError(f"feature memory must be non-negative, got {self.feature_memory_mb}")

    @property
    def cache_root(self) -> str:
        return self.feature_cache or feature_cache_dir(self.output)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


METHODS = ("inctrl", "regad", "coop")


@dataclass(frozen=True)
class RegadTrainConfig:
    """A RegAD training run (``train --method regad``): the CNN, its input, and the official
    optimisation settings as defaults (SGD, lr 1e-4, momentum 0.9, 50 epochs, batches of 32
    queries, each with k supports)."""

    manifest: str
    output: str
    k: int = DEFAULT_K
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    cnn_backbone: str = "resnet18"
    cnn_weights: str = "IMAGENET1K_V1"
    image_size: int = 224
    device: str = "cpu"
    log_every: int = 20
    limits: ImageLimits = ImageLimits()

    def __post_init__(self) -> None:
        for name in ("k", "epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("momentum must lie in [0, 1) and weight decay be non-negative")
        if self.image_size < 16:
            raise ValueError(f"image size must be at least 16, got {self.image_size}")


@dataclass(frozen=True)
class CoopTrainConfig:
    """A CoOp training run (``train --method coop``): the CLIP backbone, the context length
    and class names, and CoOp's optimisation settings as defaults (SGD, lr 0.002, momentum
    0.9, weight decay 5e-4, one warm-up epoch at 1e-5, cosine, batches of 32)."""

    manifest: str
    output: str
    n_ctx: int = 16
    class_names: tuple[str, str] = ("normal", "anomalous")
    epochs: int = 50
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    seed: int = 0
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    feature_cache: str | None = None
    extract_batch_size: int = 32
    feature_memory_mb: int = 512
    log_every: int = 20
    limits: ImageLimits = ImageLimits()

    def __post_init__(self) -> None:
        for name in ("n_ctx", "epochs", "batch_size", "extract_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("momentum must lie in [0, 1); weight decay and warm-up epochs "
                             "must be non-negative")
        if len(self.class_names) != 2 or len(set(self.class_names)) != 2:
            raise ValueError(f"CoOp needs two distinct class names (normal, anomalous), got "
                             f"{list(self.class_names)}")

    @property
    def cache_root(self) -> str:
        return self.feature_cache or feature_cache_dir(self.output)
