"""The training job's configuration: flags → one frozen dataclass read everywhere."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from pipeline.config import DEFAULT_K, add_model_flags, backbone_from_args
from pipeline.model.backbone import BackboneSpec
from pipeline.model.prompts import DEFAULT_SEMANTIC_CLASSES

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. ``feature_cache`` defaults to ``<output>/feature_cache``."""

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
    max_pixels: int = 89_478_485
    min_side: int = 8

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
        return self.feature_cache or f"{self.output}/feature_cache"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _even_batch(text: str) -> int:
    value = int(text)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(
            f"expected an even batch size of at least 2 (half normal, half anomalous), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True,
                        help="auxiliary Parquet manifest; every labelled row is a training query")
    parser.add_argument("--output", required=True,
                        help="folder for heads.safetensors, the training log and the index")
    parser.add_argument("--k", type=_positive, default=DEFAULT_K,
                        help="normal prompt images per query (shots)")
    parser.add_argument("--epochs", type=_positive, default=10)
    parser.add_argument("--steps-per-epoch", type=_positive, default=100)
    parser.add_argument("--batch-size", type=_even_batch, default=16,
                        help="queries per step, half normal and half anomalous")
    parser.add_argument("--lr", type=_positive_float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                        help="constant, or cosine decay to 0 over all steps")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds head initialisation, batches, prompts and the validation draw")
    parser.add_argument("--validate-manifest", default=None,
                        help="held-out manifest scored after every epoch; the best epoch is kept")
    parser.add_argument("--feature-cache", default=None,
                        help="feature cache folder (default: OUTPUT/feature_cache); reused by "
                             "later runs and by 'score --feature-cache'")
    parser.add_argument("--extract-batch-size", type=_positive, default=32,
                        help="images per backbone batch during feature extraction")
    parser.add_argument("--semantic-classes", default=None,
                        help="comma-separated category names given the semantic prompt pair")
    parser.add_argument("--feature-memory-mb", type=int, default=512,
                        help="memory for recently used features; the rest stays on disk")
    parser.add_argument("--log-every", type=_positive, default=20,
                        help="log the loss every N steps")
    add_model_flags(parser)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {}
    if args.semantic_classes is not None:
        kw["semantic_classes"] = frozenset(
            c.strip() for c in args.semantic_classes.split(",") if c.strip())
    return TrainConfig(
        manifest=args.manifest,
        output=args.output.rstrip("/"),
        k=args.k,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
        backbone=backbone_from_args(args),
        validate_manifest=args.validate_manifest,
        feature_cache=args.feature_cache,
        extract_batch_size=args.extract_batch_size,
        feature_memory_mb=args.feature_memory_mb,
        log_every=args.log_every,
        **kw,
    )
