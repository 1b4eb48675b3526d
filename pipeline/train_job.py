"""The training job: extract features → build examples → fit the heads → save heads and log.

Outputs under ``config.output``:

- ``heads.safetensors``: the kept heads (best validation epoch, else the last) with metadata
- ``heads_last_epoch.safetensors``: the last epoch's heads (only with validation)
- ``train_log.parquet`` / ``epochs.parquet`` / ``train_log.json``: loss, lr and wall time per
  step; per epoch mean loss, time and validation AUROC / AUPRC; the run's settings
- ``validation_scores.parquet``: the kept epoch's score of every validation query
- ``index/{train,validate,errors}.parquet``: cached image of each manifest row; unusable rows
- ``_feature_cache/``: the features (unless ``--feature-cache`` points elsewhere)

With ``--method regad`` / ``--method coop`` (``run_regad_training`` / ``run_coop_training``)
it writes ``regad.safetensors`` / ``coop.safetensors`` and the same training log instead of
heads; CoOp extracts CLIP features into the cache and ``index/`` as above, RegAD reads the
manifest's normal images itself.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass, replace
from typing import Sequence

import fsspec
import pandas as pd
import torch

from pipeline.core.feature_cache import FeatureCache
from pipeline.core.manifest import ManifestSchemaError, validate_manifest_schema
from pipeline.extract_job import ExtractionReport, extract_manifests
from pipeline.model.backbone import Geometry, get_backbone
from pipeline.model.checkpoint import HeadsMetadata, save_heads
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLModel, build_text_features
from pipeline.model.scorers.coop import CoopPrompts, coop_metadata, save_coop
from pipeline.model.scorers.regad import (REGAD_STRIDES, RegadModel, RegadSpec, regad_metadata,
                                          save_regad)
from pipeline.model.weights import seeded
from pipeline.train.config import CoopTrainConfig, RegadTrainConfig, TrainConfig
from pipeline.train.coop import CoopSettings, fit_coop
from pipeline.train.data import (EpisodeSampler, FeatureStore, TrainingDataError, TrainingSet,
                                 read_index)
from pipeline.train.log import TrainLog
from pipeline.train.loop import CachedBatches, FitResult, LoopSettings, fit
from pipeline.train.loss import ALPHA, GAMMA
from pipeline.train.regad import RegadSettings, SupportSampler, fit_regad, read_normal_images
from pipeline.train.validate import ValidationSet, score_validation, validation_metrics

LOG = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
LAST_HEADS_FILE = "heads_last_epoch.safetensors"
VALIDATION_SCORES_FILE = "validation_scores.parquet"
TRAIN, VALIDATE = "train", "validate"
LOSS_DESCRIPTION = (f"focal(alpha={ALPHA:g}, gamma={GAMMA:g}) on the probabilities of the final "
                    "and the image-residual score")


@dataclass
class TrainResult:
    heads_path: str
    heads_hash: str
    metadata: HeadsMetadata
    fit: FitResult
    extraction: ExtractionReport
    log_paths: dict[str, str]
    scorer: InCTRLModel  # holds the kept heads, in eval mode


def manifest_digest(path: str) -> str:
    """sha256 of the manifest's bytes (of each file, with its name, for a folder)."""
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(local):
        raise ManifestSchemaError(f"manifest not found: {path}")
    digest = hashlib.sha256()
    if fs.isdir(local):
        for name in sorted(fs.find(local)):
            if posixpath.basename(name).startswith((".", "_")):
                continue
            digest.update(posixpath.relpath(name, local).encode() + b"\0")
            digest.update(fs.cat_file(name))
    else:
        digest.update(fs.cat_file(local))
    return digest.hexdigest()


def check_labels(manifest: str) -> None:
    """Fail before any extraction when the manifest cannot train: no normal or no anomalous row."""
    schema = validate_manifest_schema(manifest)
    if "label" not in schema.names:
        raise TrainingDataError(f"training manifest {manifest} has no 'label' column; every "
                                "labelled row is a training query")
    labels = pd.read_parquet(manifest, columns=["label"])["label"]
    for value, name in ((1, "anomalous"), (0, "normal")):
        if not (labels == value).any():
            raise TrainingDataError(f"training manifest {manifest} has no {name} (label "
                                    f"{value}) row; the heads learn from both kinds")


def run_training(config: TrainConfig, beam_args: Sequence[str] = ()) -> TrainResult:
    """Train the heads as ``config`` says; blocks until done and returns what was written."""
    check_labels(config.manifest)
    fs, _, (out_local,) = fsspec.get_fs_token_paths(config.output)
    fs.makedirs(out_local, exist_ok=True)
    spec = config.backbone
    manifests = {TRAIN: config.manifest}
    if config.validate_manifest:
        manifests[VALIDATE] = config.validate_manifest
    extraction = extract_manifests(manifests, config.cache_root, f"{config.output}/index", spec,
                                   config.extract_batch_size, beam_args, config.limits)
    data, vset = _examples(config, extraction)

    backbone = get_backbone(spec)
    device, geometry = backbone.device, backbone.geometry
    categories = sorted(set(data.categories) | set(vset.categories if vset else []))
    text = {c: build_text_features(backbone, c, config.semantic_classes).cpu()
            for c in categories}
    store = FeatureStore(FeatureCache(config.cache_root, spec), config.feature_memory_mb << 20)
    heads = InCTRLHeads.seeded(geometry.embed_dim, geometry.num_patches, config.seed)
    scorer = InCTRLModel(geometry, heads).to(device)

    validate = None
    if vset is not None:
        def validate(s: InCTRLModel):
            scores = score_validation(s, store, vset, text, config.batch_size, device)
            return validation_metrics(scores), scores

    settings = LoopSettings(config.epochs, config.steps_per_epoch, config.lr,
                            config.weight_decay, config.lr_schedule, config.log_every)
    sampler = EpisodeSampler(data, config.batch_size, config.seed)
    result = fit(scorer, sampler, CachedBatches(store, data, device), text, settings, validate)

    meta = heads_metadata(config, geometry, manifest_digest(config.manifest), result)
    heads_path = f"{config.output}/{HEADS_FILE}"
    digest = save_heads(result.heads, heads_path, meta)
    if vset is not None:
        last_meta = replace(meta, extra=dict(meta.extra, heads_of_epoch=config.epochs))
        save_heads(result.last_heads, f"{config.output}/{LAST_HEADS_FILE}", last_meta)
    if result.validation_scores is not None:
        with fsspec.open(f"{config.output}/{VALIDATION_SCORES_FILE}", "wb") as f:
            result.validation_scores.to_parquet(f, index=False)

    result.log.info.update(
        heads=heads_path, heads_hash=digest, metadata=json.loads(meta.to_json()),
        extraction=extraction.to_dict(), device=str(device), feature_reads=store.reads,
        train_queries={"normal": int(len(data.normal)), "anomalous": int(len(data.anomalous))},
        validation_queries=len(vset) if vset is not None else 0,
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    log_paths = result.log.write(config.output)
    LOG.info("Wrote heads %s (%s, epoch %d) and the training log %s", heads_path, digest,
             result.best_epoch, log_paths["json"])
    return TrainResult(heads_path, digest, meta, result, extraction, log_paths, scorer)


def _examples(config: TrainConfig,
              extraction: ExtractionReport) -> tuple[TrainingSet, ValidationSet | None]:
    data = TrainingSet(read_index(extraction.index[TRAIN]), config.k)
    if not config.validate_manifest:
        return data, None
    val_index = read_index(extraction.index[VALIDATE])
    shared = set(val_index["content_hash"]) & set(data.index["content_hash"])
    if shared:
        LOG.warning("%d validation images also appear in the training manifest; the validation "
                    "metrics are not held-out for them", len(shared))
    return data, ValidationSet(val_index, config.k, config.seed)


def heads_metadata(config: TrainConfig, geometry: Geometry, manifest_hash: str,
                   result: FitResult) -> HeadsMetadata:
    """What the kept heads were trained with (no timestamps: identical runs, identical files)."""
    spec = config.backbone
    extra = {
        "epochs": config.epochs, "steps_per_epoch": config.steps_per_epoch,
        "steps": config.total_steps, "batch_size": config.batch_size, "lr": config.lr,
        "weight_decay": config.weight_decay, "lr_schedule": config.lr_schedule,
        "optimizer": "AdamW", "loss": LOSS_DESCRIPTION, "seed": config.seed,
        "best_epoch": result.best_epoch, "heads_of_epoch": result.best_epoch,
        "train_manifest": config.manifest, "validate_manifest": config.validate_manifest,
        "feature_identity": spec.feature_id,
        **{f"val_{k}": v for k, v in result.best_metrics.items()},
    }
    return HeadsMetadata(
        backbone=spec.name, pretrained=spec.pretrained, blocks=geometry.blocks,
        image_size=geometry.image_size, embed_dim=geometry.embed_dim,
        num_patches=geometry.num_patches, k=config.k, train_manifest_hash=manifest_hash,
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# RegAD and CoOp: trained once on the auxiliary manifest, like InCTRL's heads
# --------------------------------------------------------------------------------------------

REGAD_FILE = "regad.safetensors"
COOP_FILE = "coop.safetensors"


@dataclass
class TrainedScorerResult:
    """What ``train --method regad|coop`` wrote: the checkpoint, its hash and metadata."""

    path: str
    digest: str
    metadata: dict
    log: TrainLog
    log_paths: dict[str, str]


def _write_log(log: TrainLog, output: str, **info) -> dict[str, str]:
    log.info.update(info, finished_at=dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"))
    return log.write(output)


def run_regad_training(config: RegadTrainConfig) -> TrainedScorerResult:
    """Train RegAD (CNN stages, transformers, heads) on the manifest's normal images; write
    ``regad.safetensors`` and the training log under ``config.output``."""
    validate_manifest_schema(config.manifest)
    fs, _, (out_local,) = fsspec.get_fs_token_paths(config.output)
    fs.makedirs(out_local, exist_ok=True)
    spec = RegadSpec(config.cnn_backbone, config.cnn_weights, REGAD_STRIDES, config.image_size,
                     config.seed)
    images = read_normal_images(config.manifest, config.image_size, config.limits)
    model = RegadModel(spec)
    sampler = SupportSampler(images, config.batch_size, config.k, config.seed)
    settings = RegadSettings(config.epochs, config.lr, config.momentum, config.weight_decay,
                             config.log_every)
    with seeded(config.seed):
        log = fit_regad(model, images, sampler, settings, _device(config.device))
    extra = {
        "k": config.k, "epochs": config.epochs, "batch_size": config.batch_size,
        "lr": config.lr, "momentum": config.momentum, "weight_decay": config.weight_decay,
        "optimizer": "SGD", "lr_schedule": "cosine over epochs", "seed": config.seed,
        "loss": "symmetric negative cosine, stop-gradient (query vs mean of k supports)",
        "train_manifest": config.manifest, "train_manifest_hash": manifest_digest(config.manifest),
        "train_images": len(images.image_ids), "train_groups": len(sampler.groups),
        "final_mean_loss": log.epochs[-1]["mean_loss"] if log.epochs else None,
    }
    path = f"{config.output}/{REGAD_FILE}"
    digest = save_regad(model.cpu(), path, extra)
    meta = regad_metadata(model, extra)
    paths = _write_log(log, config.output, checkpoint=path, checkpoint_hash=digest,
                       metadata=meta, method="regad", skipped_images=images.skipped)
    LOG.info("Wrote RegAD %s (%s) and the training log %s", path, digest, paths["json"])
    return TrainedScorerResult(path, digest, meta, log, paths)


def run_coop_training(config: CoopTrainConfig, beam_args: Sequence[str] = ()
                      ) -> TrainedScorerResult:
    """Train CoOp's context on the manifest's labelled images (CLIP features extracted into
    the feature cache first, as for InCTRL); write ``coop.safetensors`` and the log."""
    check_labels(config.manifest)
    fs, _, (out_local,) = fsspec.get_fs_token_paths(config.output)
    fs.makedirs(out_local, exist_ok=True)
    spec = config.backbone
    extraction = extract_manifests({TRAIN: config.manifest}, config.cache_root,
                                   f"{config.output}/index", spec, config.extract_batch_size,
                                   beam_args, config.limits)
    index = read_index(extraction.index[TRAIN])
    index = index[index["label"].notna()].reset_index(drop=True)
    if index.empty or index["label"].nunique() < 2:
        raise TrainingDataError("CoOp needs readable normal (0) and anomalous (1) images in "
                                f"the training manifest {config.manifest}")
    store = FeatureStore(FeatureCache(config.cache_root, spec), config.feature_memory_mb << 20)
    embeds = torch.cat([store.get(h).embeds for h in index["content_hash"]])
    labels = torch.tensor(index["label"].to_numpy(dtype="int64"))
    backbone = get_backbone(spec)
    prompts = CoopPrompts(backbone.model, backbone.tokenizer, config.n_ctx,
                          config.class_names, config.seed)
    settings = CoopSettings(config.epochs, config.batch_size, config.lr, config.momentum,
                            config.weight_decay, config.warmup_epochs, config.seed,
                            config.log_every)
    log = fit_coop(backbone.model, prompts, embeds, labels, settings)
    extra = {
        "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
        "momentum": config.momentum, "weight_decay": config.weight_decay,
        "warmup_epochs": config.warmup_epochs, "optimizer": "SGD", "seed": config.seed,
        "loss": "cross-entropy over (normal, anomalous)",
        "train_manifest": config.manifest, "train_manifest_hash": manifest_digest(config.manifest),
        "train_images": {"normal": int((labels == 0).sum()), "anomalous": int((labels == 1).sum())},
        "feature_identity": spec.feature_id,
        "final_mean_loss": log.epochs[-1]["mean_loss"] if log.epochs else None,
    }
    geometry = backbone.geometry
    path = f"{config.output}/{COOP_FILE}"
    digest = save_coop(prompts, path, spec.name, spec.weights_id, geometry.embed_dim, extra)
    meta = coop_metadata(prompts, spec.name, spec.weights_id, geometry.embed_dim, extra)
    paths = _write_log(log, config.output, checkpoint=path, checkpoint_hash=digest,
                       metadata=meta, method="coop", extraction=extraction.to_dict())
    LOG.info("Wrote CoOp %s (%s) and the training log %s", path, digest, paths["json"])
    return TrainedScorerResult(path, digest, meta, log, paths)


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingDataError(f"device {device!r} was asked for, but CUDA is not available")
    return dev
