"""``python -m pipeline train``: train InCTRL's adapter and heads on an auxiliary manifest."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from pipeline.cli.flags import (add_feature_cache_flag, add_io_flags, add_k_flag, add_model_flags,
                                backbone_from_args, even_batch, finite_float, non_negative_int,
                                parse_with_beam, positive_float, positive_int)
from pipeline.core.layout import FEATURE_CACHE_DIR
from pipeline.core.preflight import check_writable
from pipeline.train.config import LR_SCHEDULES, TrainConfig

LOG = logging.getLogger(__name__)

DESCRIPTION = """\
Train InCTRL's adapter and two scoring heads on an auxiliary dataset; the CLIP towers stay
frozen. Features are extracted once into a feature cache (reused by later runs), then every
labelled manifest row is a training query with k normal prompts of its dataset and category,
drawn anew at every step. Batches are half normal, half anomalous. Loss: binary focal loss
(alpha 1, gamma 2) on the final score plus on the image-residual score, optimised with AdamW.
The focal loss is computed on the scores as probabilities (InCTRL's published code passes
sigmoid outputs to a with-logits loss, i.e. applies the sigmoid twice; this does not).
Unrecognised flags go to Apache Beam (the extraction job), e.g. --runner.
"""

EPILOG = """\
outputs in OUTPUT: heads.safetensors (score with: python -m pipeline score --checkpoint
OUTPUT/heads.safetensors ...), train_log.parquet / epochs.parquet / train_log.json,
validation_scores.parquet, index/, _feature_cache/.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = add_io_flags(
        parser, manifest_help="auxiliary Parquet manifest; every labelled row is a training query",
        output_help="folder for heads.safetensors, the training log and the index")
    g.add_argument("--validate-manifest", default=None,
                   help="held-out manifest scored after every epoch; the best epoch is kept")
    add_feature_cache_flag(g, f"feature cache folder (default: OUTPUT/{FEATURE_CACHE_DIR}); "
                              "reused by later runs and by 'score --feature-cache'")
    g = parser.add_argument_group("training")
    add_k_flag(g, "normal prompt images per query (shots)")
    g.add_argument("--epochs", type=positive_int, default=10)
    g.add_argument("--steps-per-epoch", type=positive_int, default=100)
    g.add_argument("--batch-size", type=even_batch, default=16,
                   help="queries per step, half normal and half anomalous")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=finite_float, default=0.01, help="AdamW weight decay")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant, or cosine decay to 0 over all steps")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds head initialisation, batches, prompts and the validation draw")
    g.add_argument("--extract-batch-size", type=positive_int, default=32,
                   help="images per backbone batch during feature extraction")
    g.add_argument("--feature-memory-mb", type=non_negative_int, default=512,
                   help="memory for recently used features; the rest stays on disk")
    g.add_argument("--log-every", type=positive_int, default=20,
                   help="log the loss every N steps")
    add_model_flags(parser)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {}
    if args.semantic_classes is not None:
        kw["semantic_classes"] = args.semantic_classes
    return TrainConfig(
        manifest=args.manifest, output=args.output.rstrip("/"), k=args.k, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed,
        backbone=backbone_from_args(args), validate_manifest=args.validate_manifest,
        feature_cache=args.feature_cache, extract_batch_size=args.extract_batch_size,
        feature_memory_mb=args.feature_memory_mb, log_every=args.log_every, **kw)


def parse_train_args(argv: Sequence[str] | None) -> tuple[TrainConfig, list[str]]:
    parser = build_parser()
    args, beam_args = parse_with_beam(parser, argv)
    try:
        config = train_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return config, beam_args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline train``; returns the exit status."""
    from pipeline.train.data import MissingFeaturesError, TrainingDataError
    from pipeline.train_job import run_training

    config, beam_args = parse_train_args(argv)
    check_writable(config.output)
    try:
        result = run_training(config, beam_args)
    except (TrainingDataError, MissingFeaturesError) as exc:
        LOG.error("train failed: %s", exc)
        return 1
    LOG.info("Heads: %s (best epoch %d%s)", result.heads_path, result.fit.best_epoch,
             ", validation AUROC %.4f" % result.fit.best_metrics["auroc"]
             if result.fit.best_metrics else "")
    return 0
