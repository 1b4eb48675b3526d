"""Training CoOp's context vectors on labelled auxiliary images (core layer, no Beam).

As the official CoOp trainer (KaiyangZhou/CoOp ``trainers/coop.py`` with its configs): the
CLIP towers are frozen and only the context vectors learn; the loss is the cross-entropy of
CLIP's logits (``exp(logit_scale)·cos``) against the labels (0 normal, 1 anomalous); SGD
with momentum 0.9 and weight decay 5e-4, learning rate 0.002 with a cosine decay over the
epochs, the first ``warmup_epochs`` at a constant 1e-5 (``WARMUP_TYPE=constant``,
``WARMUP_CONS_LR=1e-5``); batches of 32 images in a fresh seeded order every epoch. The
image embeddings come from the feature cache the train job fills (the pooled, projected CLIP
image feature), so the image tower never runs here.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.scorers.coop import CoopPrompts, coop_logits, prompt_features
from pipeline.train.log import TrainLog

LOG = logging.getLogger(__name__)

WARMUP_LR = 1e-5  # CoOp's constant warm-up learning rate


@dataclass(frozen=True)
class CoopSettings:
    epochs: int = 50
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    seed: int = 0
    log_every: int = 20


def coop_epoch_lr(settings: CoopSettings, epoch: int) -> float:
    """Epoch e (1-based): the warm-up constant for e ≤ warmup_epochs, then
    lr·½(1 + cos(π(e − 1)/epochs)) (Dassl's cosine stepped once per epoch)."""
    if epoch <= settings.warmup_epochs:
        return WARMUP_LR
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / settings.epochs))


def fit_coop(clip_model: nn.Module, prompts: CoopPrompts, embeds: torch.Tensor,
             labels: torch.Tensor, settings: CoopSettings) -> TrainLog:
    """Train ``prompts.ctx`` in place on image embeddings (N, D) with labels (N,) in {0, 1}.

    Returns the log: per step the loss and the batch accuracy."""
    if embeds.shape[0] != labels.shape[0] or embeds.shape[0] == 0:
        raise ValueError(f"need as many labels as embeddings, and some: {embeds.shape[0]} "
                         f"embeddings, {labels.shape[0]} labels")
    device = prompts.ctx.device
    embeds, labels = embeds.to(device).float(), labels.to(device).long()
    scale = clip_model.logit_scale.detach().float()
    optimizer = torch.optim.SGD([prompts.ctx], lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    rng = np.random.default_rng(settings.seed)
    log = TrainLog()
    start, step = time.perf_counter(), 0
    for epoch in range(1, settings.epochs + 1):
        lr = coop_epoch_lr(settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start, losses = time.perf_counter(), []
        order = torch.from_numpy(rng.permutation(embeds.shape[0])).to(device)
        for first in range(0, len(order), settings.batch_size):
            t0 = time.perf_counter()
            idx = order[first:first + settings.batch_size]
            logits = coop_logits(embeds[idx], prompt_features(clip_model, prompts), scale)
            loss = F.cross_entropy(logits, labels[idx])
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the CoOp training loss became {value}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(value)
            accuracy = float((logits.argmax(-1) == labels[idx]).float().mean())
            now = time.perf_counter()
            log.add_step(epoch=epoch, step=step, loss=value, accuracy=accuracy, lr=lr,
                         wall_time_s=now - start, step_time_s=now - t0)
            if step % settings.log_every == 0:
                LOG.info("Step %d (epoch %d): loss %.4f, accuracy %.3f, lr %.2e", step, epoch,
                         value, accuracy, lr)
        mean_loss = sum(losses) / len(losses)
        LOG.info("Epoch %d/%d: mean loss %.4f", epoch, settings.epochs, mean_loss)
        log.add_epoch(epoch=epoch, steps=len(losses), mean_loss=mean_loss,
                      epoch_time_s=time.perf_counter() - epoch_start,
                      wall_time_s=time.perf_counter() - start)
    return log
