"""The scoring job's configuration: one frozen dataclass, built once (``pipeline.cli.flags``
turns command-line flags into it) and passed to every constructor."""
from __future__ import annotations

import datetime as dt
import os
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from pipeline.core.calibration import DEFAULT_FALSE_ALARM_RATE, check_alpha
from pipeline.core.failures import DEFAULT_MAX_FAILED_FRACTION, check_fraction
from pipeline.core.images import ImageLimits
from pipeline.model.backbone import BackboneSpec
from pipeline.model.prompts import DEFAULT_SEMANTIC_CLASSES
from pipeline.model.scorers.references import RANDOM, REPRESENTATIVE, SELECTIONS
from pipeline.model.scorers.registry import DEFAULT_SCORERS
from pipeline.model.scorers.suite import SuiteSpec, parse_scorers

DEFAULT_K = 4
DEFAULT_BATCH_SIZE = 16

# On a GPU one process must decode for a model that runs thousands of images a second.
MAX_AUTO_DECODE_THREADS = 8

# Query rows per (dataset, category) chunk, in batches: big enough that batches rarely mix
# groups, small enough that one big category still spreads over many workers.
QUERY_CHUNK_BATCHES = 4


def default_decode_threads(spec: BackboneSpec) -> int:
    """Decode threads when none are asked for: the usable cores (at most 8) for a CUDA
    backbone; 1 (decode inline) on the CPU, where the model's own threads use the cores."""
    if not spec.device.startswith("cuda"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_AUTO_DECODE_THREADS, cores or 1))


def today_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


@dataclass(frozen=True)
class ScoreConfig:
    """Everything the scoring pipeline needs; built once from flags, read everywhere."""

    manifest: str
    output: str
    k: int = DEFAULT_K
    seeds: tuple[int, ...] = (0,)
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    checkpoint: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    write_patch_map: bool = False
    semantic_classes: frozenset[str] = DEFAULT_SEMANTIC_CLASSES
    limits: ImageLimits = ImageLimits()
    run_date: str = field(default_factory=today_utc)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    share_model_across_processes: bool = False
    feature_cache: str | None = None
    # Threads reading and decoding images per worker process; 0: chosen from the device.
    decode_threads: int = 0
    # The scorers compared in the run, and their extractors' and their own settings by
    # name (``pipeline.model.scorers.registry.options()``; unnamed ones take defaults).
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    options: Mapping[str, Any] = field(default_factory=dict)
    # Anomaly maps of each scored query as files (OUT/maps/...), and pixel metrics against
    # the manifest's masks (set by run_score when the manifest has a mask_uri column).
    write_anomaly_maps: bool = False
    pixel_metrics: bool = False
    # How each group's k references are chosen from its normal candidates: the seeded draw
    # (random), or the k that best cover a pool of them (representative; the pool is every
    # candidate, or a seeded sample of reference_pool_limit).
    reference_selection: str = RANDOM
    reference_pool_limit: int | None = None
    # The stated false-alarm rate alpha of each query's calibrated decision.
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    # Above this fraction of failed (query, seed, scorer) rows the run does not commit.
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION

    def __post_init__(self) -> None:
        check_alpha(self.false_alarm_rate)
        object.__setattr__(self, "max_failed_fraction", check_fraction(self.max_failed_fraction))
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be 0 (auto) or more, got {self.decode_threads}")
        if self.k < 0:
            raise ValueError(f"k must be 0 (zero-shot) or more, got {self.k}")
        object.__setattr__(self, "scorers", parse_scorers(self.scorers))
        if self.reference_selection not in SELECTIONS:
            raise ValueError(f"reference_selection must be one of {SELECTIONS}, got "
                             f"{self.reference_selection!r}")
        if self.reference_pool_limit is not None and self.reference_pool_limit < max(1, self.k):
            raise ValueError(f"reference_pool_limit ({self.reference_pool_limit}) must be at "
                             f"least k ({self.k})")
        object.__setattr__(self, "options", dict(self.options))
        self.suite.check(self.k)  # unknown settings, k below a scorer's minimum, ...
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")

    @cached_property
    def suite(self) -> SuiteSpec:
        """The scorers and the models they read (hashable; it keys worker caches)."""
        return SuiteSpec(self.scorers, self.backbone, self.checkpoint,
                         tuple(self.options.items()), descriptors=self.representative)

    @property
    def representative(self) -> bool:
        return self.reference_selection == REPRESENTATIVE

    @property
    def reference_draw(self) -> int | None:
        """Candidates drawn per group and seed: k, or the pool (None: every candidate)."""
        return self.reference_pool_limit if self.representative else self.k

    @property
    def anomaly_maps(self) -> bool:
        """Whether scoring computes each query's anomaly map (files or pixel metrics)."""
        return self.write_anomaly_maps or self.pixel_metrics

    @property
    def decode_thread_count(self) -> int:
        """Decode threads per worker process: as asked, or chosen from the device."""
        return self.decode_threads or default_decode_threads(self.backbone)

    @property
    def query_chunk(self) -> int:
        """Query rows per (dataset, category) chunk on their way to the fused scoring stage."""
        return QUERY_CHUNK_BATCHES * self.batch_size

    @property
    def features_on_device(self) -> bool:
        """Query features stay on the GPU for the fused ScoreQueries (no 2.4 MB round trip per
        image through host memory); a model served from another process returns host
        tensors anyway."""
        return self.backbone.device.startswith("cuda") and not self.share_model_across_processes
