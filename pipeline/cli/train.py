"""``python -m pipeline train``: train InCTRL's adapter and heads (``--method inctrl``, the
default), RegAD (``--method regad``) or CoOp's context (``--method coop``) on an auxiliary
manifest."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from pipeline.cli.flags import (add_feature_cache_flag, add_io_flags, add_k_flag, add_model_flags,
                                backbone_from_args, finite_float, non_negative_int,
                                parse_with_beam, positive_float, positive_int)
from pipeline.core.config import DEFAULT_K
from pipeline.core.layout import FEATURE_CACHE_DIR
from pipeline.core.preflight import check_writable
from pipeline.model.scorers.coop import CLASS_NAMES, DEFAULT_N_CTX
from pipeline.model.scorers.regad import (DEFAULT_REGAD_BACKBONE, DEFAULT_REGAD_IMAGE_SIZE,
                                          DEFAULT_REGAD_WEIGHTS)
from pipeline.train.config import (LR_SCHEDULES, METHODS, CoopTrainConfig, RegadTrainConfig,
                                   TrainConfig)

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

--method regad trains RegAD (Huang et al., ECCV 2022): a torchvision CNN's stages at strides
4/8/16 (--cnn-backbone, --cnn-weights) with a spatial transformer after each, and Siamese
heads, on the manifest's normal images: each query against the mean of k supports of its
category, symmetric negative cosine loss with stop-gradient, SGD (the official settings by
default). --method coop trains CoOp's 16 context vectors (Zhou et al., IJCV 2022) for the
classes "normal" and "anomalous" with cross-entropy on the labelled images' CLIP embeddings,
towers frozen.
"""

EPILOG = """\
outputs in OUTPUT: heads.safetensors (score with: python -m pipeline score --checkpoint
OUTPUT/heads.safetensors ...), train_log.parquet / epochs.parquet / train_log.json,
validation_scores.parquet, index/, _feature_cache/. With --method regad: regad.safetensors
and the training log; with --method coop: coop.safetensors, the training log, index/ and
_feature_cache/.

defaults that depend on --method (inctrl / regad / coop): --epochs 10 / 50 / 50,
--batch-size 16 / 32 / 32, --lr 1e-3 / 1e-4 / 2e-3, --weight-decay 0.01 / 0 / 5e-4.
"""

# method → (epochs, batch size, lr, weight decay) when the flag is not given
_DEFAULTS = {"inctrl": (10, 16, 1e-3, 0.01), "regad": (50, 32, 1e-4, 0.0),
             "coop": (50, 32, 2e-3, 5e-4)}
_INCTRL_ONLY = ("steps_per_epoch", "validate_manifest", "lr_schedule", "semantic_classes")
_REGAD_ONLY = ("cnn_backbone", "cnn_weights", "cnn_image_size")
_COOP_ONLY = ("coop_context", "coop_classes", "warmup_epochs")


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
    g.add_argument("--method", choices=METHODS, default="inctrl",
                   help="what to train: InCTRL's heads (default), RegAD, or CoOp's context")
    add_k_flag(g, f"shots: normal prompt images per query (inctrl), supports per query "
                  f"(regad); default {DEFAULT_K}; coop takes none")
    parser.set_defaults(k=None)
    g.add_argument("--epochs", type=positive_int, default=None,
                   help="default 10 (inctrl), 50 (regad, coop: passes over the images)")
    g.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="inctrl only (default 100)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="queries per step: inctrl 16 (even: half normal, half anomalous), "
                        "regad 32 (of one category), coop 32 images")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate: AdamW 1e-3 (inctrl), SGD 1e-4 (regad), SGD 2e-3 (coop)")
    g.add_argument("--weight-decay", type=finite_float, default=None,
                   help="default 0.01 (inctrl), 0 (regad), 5e-4 (coop)")
    g.add_argument("--momentum", type=finite_float, default=None,
                   help="SGD momentum (regad, coop; default 0.9)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="inctrl: constant (default), or cosine decay to 0 over all steps; "
                        "regad and coop always use a cosine over epochs")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds head initialisation, batches, prompts and the validation draw")
    g.add_argument("--extract-batch-size", type=positive_int, default=32,
                   help="images per backbone batch during feature extraction")
    g.add_argument("--feature-memory-mb", type=non_negative_int, default=512,
                   help="memory for recently used features; the rest stays on disk")
    g.add_argument("--log-every", type=positive_int, default=20,
                   help="log the loss every N steps")
    g = parser.add_argument_group("regad")
    g.add_argument("--cnn-backbone", default=None,
                   help=f"torchvision CNN (default {DEFAULT_REGAD_BACKBONE}); its stages at "
                        "strides 4, 8, 16 are trained with the transformers")
    g.add_argument("--cnn-weights", default=None,
                   help=f"its initial weights: a torchvision weights name (default "
                        f"{DEFAULT_REGAD_WEIGHTS}), a state-dict file, or random[:SEED]")
    g.add_argument("--cnn-image-size", type=positive_int, default=None,
                   help=f"input side in pixels (default {DEFAULT_REGAD_IMAGE_SIZE})")
    g = parser.add_argument_group("coop")
    g.add_argument("--coop-context", type=positive_int, default=None, metavar="M",
                   help=f"learned context vectors (default {DEFAULT_N_CTX})")
    g.add_argument("--coop-classes", default=None, metavar="NORMAL,ANOMALOUS",
                   help=f"the two class names after the context (default "
                        f"{','.join(CLASS_NAMES)})")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=None,
                   help="epochs at the constant warm-up lr 1e-5 (default 1)")
    add_model_flags(parser)
    return parser


def _check_method_flags(args: argparse.Namespace) -> None:
    """ValueError naming a flag given for another method than ``--method``."""
    wrong = {"inctrl": _REGAD_ONLY + _COOP_ONLY + ("momentum",),
             "regad": _INCTRL_ONLY + _COOP_ONLY + ("feature_cache", "backbone", "pretrained",
                                                   "precision"),
             "coop": _INCTRL_ONLY + _REGAD_ONLY + ("k",)}[args.method]
    for name in wrong:
        value = getattr(args, name)
        if name == "feature_cache" and value is None:
            continue
        if value is not None:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method "
                             f"{args.method}")


def train_config_from_args(args: argparse.Namespace
                           ) -> TrainConfig | RegadTrainConfig | CoopTrainConfig:
    _check_method_flags(args)
    epochs, batch, lr, decay = _DEFAULTS[args.method]
    epochs = args.epochs or epochs
    batch = args.batch_size or batch
    lr = args.lr or lr
    decay = decay if args.weight_decay is None else args.weight_decay
    k = args.k or DEFAULT_K
    momentum = 0.9 if args.momentum is None else args.momentum
    out = args.output.rstrip("/")
    if args.method == "regad":
        return RegadTrainConfig(
            manifest=args.manifest, output=out, k=k, epochs=epochs, batch_size=batch, lr=lr,
            momentum=momentum, weight_decay=decay, seed=args.seed,
            cnn_backbone=args.cnn_backbone or DEFAULT_REGAD_BACKBONE,
            cnn_weights=args.cnn_weights or DEFAULT_REGAD_WEIGHTS,
            image_size=args.cnn_image_size or DEFAULT_REGAD_IMAGE_SIZE, device=args.device,
            log_every=args.log_every)
    if args.method == "coop":
        classes = CLASS_NAMES
        if args.coop_classes is not None:
            classes = tuple(c.strip() for c in args.coop_classes.split(","))
        return CoopTrainConfig(
            manifest=args.manifest, output=out, n_ctx=args.coop_context or DEFAULT_N_CTX,
            class_names=classes, epochs=epochs, batch_size=batch, lr=lr,
            momentum=momentum, weight_decay=decay,
            warmup_epochs=1 if args.warmup_epochs is None else args.warmup_epochs,
            seed=args.seed, backbone=backbone_from_args(args, training=True),
            feature_cache=args.feature_cache,
            extract_batch_size=args.extract_batch_size,
            feature_memory_mb=args.feature_memory_mb, log_every=args.log_every)
    kw = {}
    if args.semantic_classes is not None:
        kw["semantic_classes"] = args.semantic_classes
    return TrainConfig(
        manifest=args.manifest, output=out, k=k, epochs=epochs,
        steps_per_epoch=args.steps_per_epoch or 100, batch_size=batch, lr=lr,
        weight_decay=decay, lr_schedule=args.lr_schedule or "constant", seed=args.seed,
        backbone=backbone_from_args(args, training=True),
        validate_manifest=args.validate_manifest,
        feature_cache=args.feature_cache, extract_batch_size=args.extract_batch_size,
        feature_memory_mb=args.feature_memory_mb, log_every=args.log_every, **kw)


def parse_train_args(argv: Sequence[str] | None
                     ) -> tuple[TrainConfig | RegadTrainConfig | CoopTrainConfig, list[str]]:
    parser = build_parser()
    args, beam_args = parse_with_beam(parser, argv)
    try:
        config = train_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return config, beam_args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipeline train``; returns the exit status."""
    from pipeline.model.scorers.cnn import CnnLoadError
    from pipeline.train.data import MissingFeaturesError, TrainingDataError
    from pipeline.train_job import run_coop_training, run_regad_training, run_training

    config, beam_args = parse_train_args(argv)
    check_writable(config.output)
    try:
        if isinstance(config, RegadTrainConfig):
            if beam_args:
                LOG.warning("--method regad runs no Beam job; ignoring %s", " ".join(beam_args))
            trained = run_regad_training(config)
        elif isinstance(config, CoopTrainConfig):
            trained = run_coop_training(config, beam_args)
        else:
            trained = None
            result = run_training(config, beam_args)
    except (TrainingDataError, MissingFeaturesError, CnnLoadError) as exc:
        LOG.error("train failed: %s", exc)
        return 1
    if trained is not None:
        LOG.info("%s: %s (%s)", trained.metadata["format"], trained.path, trained.digest)
        return 0
    LOG.info("Heads: %s (best epoch %d%s)", result.heads_path, result.fit.best_epoch,
             ", validation AUROC %.4f" % result.fit.best_metrics["auroc"]
             if result.fit.best_metrics else "")
    return 0
