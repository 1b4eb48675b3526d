"""The job's configuration: command-line flags become one frozen dataclass passed to constructors."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import uuid
from dataclasses import dataclass, field, replace

from pipeline.model.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, PRECISIONS, BackboneSpec
from pipeline.model.prompts import DEFAULT_SEMANTIC_CLASSES

DEFAULT_K = 4
DEFAULT_BATCH_SIZE = 16

# On a GPU one process must decode for a model that runs thousands of images a second.
MAX_AUTO_DECODE_THREADS = 8


def default_decode_threads(spec: BackboneSpec) -> int:
    """Decode threads when none are asked for: the usable cores (at most 8) for a CUDA
    backbone; 1 (decode inline) on the CPU, where the model's own threads use the cores."""
    if not spec.device.startswith("cuda"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_AUTO_DECODE_THREADS, cores or 1))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from exc


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


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
    max_pixels: int = 89_478_485
    min_side: int = 8
    run_date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).date().isoformat())
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    share_model_across_processes: bool = False
    # Nightly mode: only queries of this date (by ``capture_date``) are scored.
    only_date: str | None = None
    feature_cache: str | None = None
    # Threads reading and decoding images per worker process; 0: chosen from the device.
    decode_threads: int = 0

    def __post_init__(self) -> None:
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be 0 (auto) or more, got {self.decode_threads}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")

    def with_backbone(self, spec: BackboneSpec) -> "ScoreConfig":
        return replace(self, backbone=spec)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that choose and place the backbone; shared by score, train and nightly."""
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, help="open_clip model name")
    g.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="open_clip tag, weights file, 'local-dir:DIR', 'hf-hub:ORG/REPO' or 'random[:SEED]'",
    )
    g.add_argument("--blocks", type=_int_list, default=(),
                   help="1-based ViT blocks for patch tokens (default: InCTRL's 7,9,11 of 12)")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="fp32, tf32 or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")


def backbone_from_args(args: argparse.Namespace) -> BackboneSpec:
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    return BackboneSpec(
        name=args.backbone,
        pretrained=args.pretrained,
        blocks=tuple(args.blocks),
        device=args.device,
        precision=precision,
    )


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the scoring job (also used by the nightly job)."""
    parser.add_argument("--manifest", required=True, help="Parquet manifest (file or folder)")
    parser.add_argument("--output", required=True, help="output root (local path or URL)")
    parser.add_argument("--k", type=_positive, default=DEFAULT_K, help="normal references per group")
    parser.add_argument("--seeds", type=_int_list, default=(0,),
                        help="comma-separated sampler seeds; each gives one scoring")
    parser.add_argument("--checkpoint", default=None,
                        help="trained heads (.safetensors); without it scoring is training-free")
    parser.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--write-patch-map", action="store_true",
                        help="also store each query's patch residual map")
    parser.add_argument("--semantic-classes", default=None,
                        help="comma-separated category names scored with the semantic prompt pair")
    parser.add_argument("--run-date", type=_date, default=None,
                        help="partition date YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--run-id", default=None, help="identifier written to every row")
    parser.add_argument("--feature-cache", default=None,
                        help="folder caching reference features across runs (content hash + model)")
    parser.add_argument("--decode-threads", type=int, default=0,
                        help="threads decoding images per worker process (default 0: up to 8 "
                             "on a CUDA device, 1 on the CPU)")
    parser.add_argument("--share-model-across-processes", action="store_true",
                        help="one model copy per machine (GPU workers with several SDK processes)")
    add_model_flags(parser)


def score_config_from_args(args: argparse.Namespace) -> ScoreConfig:
    kw = {}
    if args.run_date:
        kw["run_date"] = args.run_date
    if args.run_id:
        kw["run_id"] = args.run_id
    if args.semantic_classes is not None:
        kw["semantic_classes"] = frozenset(
            c.strip() for c in args.semantic_classes.split(",") if c.strip()
        )
    return ScoreConfig(
        manifest=args.manifest,
        output=args.output.rstrip("/"),
        k=args.k,
        seeds=tuple(args.seeds),
        backbone=backbone_from_args(args),
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        write_patch_map=args.write_patch_map,
        feature_cache=args.feature_cache,
        share_model_across_processes=args.share_model_across_processes,
        decode_threads=args.decode_threads,
        **kw,
    )
