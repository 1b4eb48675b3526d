"""The training job: extract features → build examples → fit the heads → save heads and log.

Outputs under ``config.output``:

- ``heads.safetensors``: the kept heads (best validation epoch, else the last) with metadata
- ``heads_last_epoch.safetensors``: the last epoch's heads (only with validation)
- ``train_log.parquet`` / ``epochs.parquet`` / ``train_log.json``: loss, lr and wall time per
  step; per epoch mean loss, time and validation AUROC / AUPRC; the run's settings
- ``validation_scores.parquet``: the kept epoch's score of every validation query
- ``index/{train,validate,errors}.parquet``: cached image of each manifest row; unusable rows
- ``_feature_cache/``: the features (unless ``--feature-cache`` points elsewhere)
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

from pipeline.core.feature_cache import FeatureCache, feature_identity
from pipeline.core.manifest import ManifestSchemaError, validate_manifest_schema
from pipeline.extract_job import ExtractionReport, extract_manifests
from pipeline.model.backbone import Geometry, get_backbone
from pipeline.model.checkpoint import HeadsMetadata, save_heads
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLScorer, build_text_features
from pipeline.train.config import TrainConfig
from pipeline.train.data import (EpisodeSampler, FeatureStore, TrainingDataError, TrainingSet,
                                 read_index)
from pipeline.train.loop import CachedBatches, FitResult, LoopSettings, fit
from pipeline.train.loss import ALPHA, GAMMA
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
    scorer: InCTRLScorer  # holds the kept heads, in eval mode


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
    scorer = InCTRLScorer(geometry, heads).to(device)

    validate = None
    if vset is not None:
        def validate(s: InCTRLScorer):
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
        "feature_identity": feature_identity(spec),
        **{f"val_{k}": v for k, v in result.best_metrics.items()},
    }
    return HeadsMetadata(
        backbone=spec.name, pretrained=spec.pretrained, blocks=geometry.blocks,
        image_size=geometry.image_size, embed_dim=geometry.embed_dim,
        num_patches=geometry.num_patches, k=config.k, train_manifest_hash=manifest_hash,
        extra=extra,
    )
