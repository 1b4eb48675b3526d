"""The training loop: AdamW on the adapter and heads, focal loss, per-epoch validation.

Loss per step = focal(final score) + focal(image-residual score), both on probabilities
(see ``pipeline.train.loss``). The backbone never runs here: features come from a batch source,
normally the on-disk cache.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import pandas as pd
import torch

from pipeline.model.backbone import ImageFeatures
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLModel
from pipeline.train.data import Episode, EpisodeSampler, FeatureStore, TrainingSet, batch_features
from pipeline.train.forward import forward_episodes, prepare_episode_references
from pipeline.train.log import TrainLog
from pipeline.train.loss import focal_loss_final, focal_loss_sigmoid

LOG = logging.getLogger(__name__)

Validator = Callable[[InCTRLModel], tuple[dict[str, float], pd.DataFrame]]


class BatchSource(Protocol):
    """Turns a batch of episodes into (queries, per-query prompts, labels) on the device."""

    def __call__(self, episodes: Sequence[Episode]
                 ) -> tuple[ImageFeatures, list[ImageFeatures], torch.Tensor]: ...


@dataclass
class CachedBatches:
    """The usual batch source: features read lazily from the disk cache."""

    store: FeatureStore
    data: TrainingSet
    device: torch.device | str = "cpu"

    def __call__(self, episodes: Sequence[Episode]):
        return batch_features(self.store, self.data, episodes, self.device)


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    steps_per_epoch: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    log_every: int = 20


@dataclass
class FitResult:
    """Trained heads (the best epoch's with validation, else the last), in eval mode."""

    heads: InCTRLHeads
    last_heads: InCTRLHeads
    best_epoch: int
    best_metrics: dict[str, float]
    log: TrainLog
    validation_scores: pd.DataFrame | None


def _lr_lambda(schedule: str, total: int) -> Callable[[int], float]:
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return lambda step: 1.0


def episode_loss(scorer: InCTRLModel, queries: ImageFeatures, prompts: Sequence[ImageFeatures],
                 labels: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its two parts (as floats, for the log)."""
    refs = prepare_episode_references(scorer, prompts)
    out = forward_episodes(scorer, queries, refs, text)
    loss_final = focal_loss_final(out.holistic_logits, out.fine, labels)
    loss_image = focal_loss_sigmoid(out.image_logits, labels)
    loss = loss_final + loss_image
    return loss, {"loss_final": loss_final.item(), "loss_image_residual": loss_image.item()}


def train_step(scorer: InCTRLModel, optimizer: torch.optim.Optimizer, batches: BatchSource,
               episodes: Sequence[Episode], text: torch.Tensor) -> dict[str, float]:
    """One optimisation step on a batch of episodes; returns the loss and its parts."""
    queries, prompts, labels = batches(episodes)
    loss, parts = episode_loss(scorer, queries, prompts, labels, text)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"the training loss became {value}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": value, **parts}


def _better(metrics: dict[str, float], best: dict[str, float] | None) -> bool:
    score = metrics.get("auroc", math.nan)
    if math.isnan(score):
        return False
    if best is None or math.isnan(best.get("auroc", math.nan)):
        return True
    return (score, metrics.get("auprc", -math.inf)) > (best["auroc"], best.get("auprc", -math.inf))


def fit(scorer: InCTRLModel, sampler: EpisodeSampler, batches: BatchSource,
        text_features: Mapping[str, torch.Tensor], settings: LoopSettings,
        validate: Validator | None = None) -> FitResult:
    """Train ``scorer.heads`` in place; returns the kept heads and the log.

    With ``validate`` the untrained heads are scored first (epoch 0, logged only) and then
    after every epoch; the epoch with the highest category-mean AUROC (then AUPRC) is kept.
    """
    heads = scorer.heads
    if heads is None:
        raise ValueError("training needs a scorer with heads")
    device = next(heads.parameters()).device
    categories = sampler.data.index["category"].tolist()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    total = settings.epochs * settings.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(settings.lr_schedule, total))
    log = TrainLog()
    best_state, best_metrics, best_epoch, best_scores = None, None, 0, None

    def run_validation(epoch: int) -> dict[str, float]:
        nonlocal best_state, best_metrics, best_epoch, best_scores
        metrics, scores = validate(scorer)
        LOG.info("Epoch %d validation: AUROC %.4f, AUPRC %.4f (category mean); pooled AUROC "
                 "%.4f", epoch, metrics["auroc"], metrics["auprc"], metrics["auroc_pooled"])
        if epoch > 0 and _better(metrics, best_metrics):
            best_state = copy.deepcopy(heads.state_dict())
            best_metrics, best_epoch, best_scores = metrics, epoch, scores
        return {f"val_{k}": v for k, v in metrics.items() if k != "categories"}

    start = time.perf_counter()
    if validate is not None:
        log.add_epoch(epoch=0, steps=0, mean_loss=math.nan, epoch_time_s=0.0, wall_time_s=0.0,
                      **run_validation(0))
    step = 0
    for epoch in range(1, settings.epochs + 1):
        scorer.train()
        epoch_start = time.perf_counter()
        losses = []
        for _ in range(settings.steps_per_epoch):
            t0 = time.perf_counter()
            episodes = sampler.next_batch()
            text = torch.stack([text_features[categories[e.query]] for e in episodes]).to(device)
            lr = optimizer.param_groups[0]["lr"]
            record = train_step(scorer, optimizer, batches, episodes, text)
            schedule.step()
            step += 1
            losses.append(record["loss"])
            now = time.perf_counter()
            log.add_step(epoch=epoch, step=step, lr=lr, wall_time_s=now - start,
                         step_time_s=now - t0, **record)
            if step % settings.log_every == 0:
                LOG.info("Step %d/%d (epoch %d): loss %.4f, lr %.2e", step, total, epoch,
                         record["loss"], lr)
        epoch_time = time.perf_counter() - epoch_start
        mean_loss = sum(losses) / len(losses)
        LOG.info("Epoch %d/%d: mean loss %.4f in %.1f s", epoch, settings.epochs, mean_loss,
                 epoch_time)
        record = dict(epoch=epoch, steps=len(losses), mean_loss=mean_loss,
                      epoch_time_s=epoch_time)
        if validate is not None:
            record.update(run_validation(epoch))
        log.add_epoch(wall_time_s=time.perf_counter() - start, **record)

    scorer.eval()
    last = copy.deepcopy(heads)
    if validate is not None and best_state is None:
        LOG.warning("Validation gave no AUROC (one class only, or no usable query); keeping "
                    "the last epoch's heads")
    if best_state is not None:
        heads.load_state_dict(best_state)
        LOG.info("Keeping the heads of epoch %d (validation AUROC %.4f)", best_epoch,
                 best_metrics["auroc"])
    else:
        best_epoch = settings.epochs
    return FitResult(heads=heads, last_heads=last, best_epoch=best_epoch,
                     best_metrics=best_metrics or {}, log=log, validation_scores=best_scores)
