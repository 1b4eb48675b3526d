"""Training RegAD's CNN stages, spatial transformers and Siamese heads (core layer, no Beam).

As the official ``train.py`` (MediaBrain-SJTU/RegAD): every normal image of the auxiliary
categories is a query once per epoch; a batch holds queries of one category, each with K
support images of the same category drawn at random (with replacement, never the query
itself: ``FSAD_Dataset_train``); the order of the batches is shuffled. The loss is
``RegadModel.siamese_loss`` (query vs the mean of its supports), optimised with SGD
(momentum 0.9) over every parameter, the backbone's BatchNorm layers in training mode
(``RegadSettings.freeze_bn`` keeps the CNN's in eval mode instead: see the README's RegAD
notes for what the training-mode statistics do to a small auxiliary set). No
augmentation in training (the official code has none). The learning rate follows a cosine
over epochs, ``lr·½(1 + cos(π(e − 1)/E))`` for epoch e = 1 … E (the official schedule uses e
instead of e − 1 and so spends its last epoch at 0).

Images are read through ``pipeline.core.images`` (RegAD trains on pixels, not the CLIP
feature cache), resized and center-cropped to the input size once, and kept as uint8.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.core.images import ImageLimits, ImageLoadError, load_pixels
from pipeline.core.manifest import ManifestRow, normalize_row
from pipeline.model.scorers.regad import RegadModel
from pipeline.train.data import TrainingDataError
from pipeline.train.log import TrainLog

LOG = logging.getLogger(__name__)

Group = tuple[str, str]


@dataclass
class NormalImages:
    """The auxiliary normal images, decoded once: pixels (N, 3, S, S) uint8, their group
    (dataset, category) and image id; ``skipped`` counts unreadable rows."""

    pixels: torch.Tensor
    groups: list[Group]
    image_ids: list[str]
    skipped: int = 0

    def by_group(self) -> dict[Group, np.ndarray]:
        out: dict[Group, list[int]] = {}
        for i, g in enumerate(self.groups):
            out.setdefault(g, []).append(i)
        return {g: np.asarray(v, dtype=np.int64) for g, v in sorted(out.items())}


def uint8_transform(image_size: int) -> Callable[[Any], torch.Tensor]:
    """PIL → (3, S, S) uint8: RGB, resize the short side to S (bilinear, antialiased),
    center crop S (the extractor's transform without ToTensor/Normalize)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(image_size),
        T.PILToTensor(),
    ])


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, S, S) → float32, as ToTensor then Normalize compute it."""
    x = pixels.float().div(255)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub(m).div(s)


def is_normal(row: ManifestRow) -> bool:
    """Label 0, or an unlabelled reference row (as the InCTRL prompt pool)."""
    return row.label == 0 or (row.label is None and row.role == "reference")


def read_normal_images(manifest: str, image_size: int,
                       limits: ImageLimits = ImageLimits()) -> NormalImages:
    """Every normal row of ``manifest`` decoded to (3, S, S) uint8, de-duplicated by content
    within a group, in (dataset, category, image_id) order; unreadable rows are skipped with
    a warning. TrainingDataError when no group keeps two images."""
    frame = pd.read_parquet(manifest)
    rows = []
    for raw in frame.to_dict("records"):
        row = normalize_row(raw)
        if isinstance(row, ManifestRow) and is_normal(row):
            rows.append(row)
    rows.sort(key=lambda r: (r.dataset, r.category, r.image_id))
    transform = uint8_transform(image_size)
    pixels, groups, ids, seen, skipped = [], [], [], set(), 0
    for row in rows:
        try:
            px, digest, _ = load_pixels(row.image_uri, transform, limits)
        except ImageLoadError as exc:
            skipped += 1
            LOG.warning("Skipping %s: %s", row.image_uri, exc)
            continue
        key = (row.dataset, row.category, digest)
        if key in seen:
            continue
        seen.add(key)
        pixels.append(px)
        groups.append((row.dataset, row.category))
        ids.append(row.image_id)
    images = NormalImages(torch.stack(pixels) if pixels else torch.empty(0, 3, image_size,
                                                                         image_size,
                                                                         dtype=torch.uint8),
                          groups, ids, skipped)
    sizes = {g: len(v) for g, v in images.by_group().items()}
    small = sorted(g for g, n in sizes.items() if n < 2)
    if small:
        LOG.warning("Leaving out %d group(s) with fewer than 2 normal images (no support for "
                    "a query), e.g. %s", len(small), small[0])
    if all(n < 2 for n in sizes.values()):
        raise TrainingDataError(
            f"the training manifest {manifest} has no dataset/category with two or more "
            "readable normal images; RegAD learns from a query and supports of its category")
    LOG.info("RegAD training images: %d normal images in %d group(s) (%d unreadable)",
             len(ids), sum(n >= 2 for n in sizes.values()), skipped)
    return images


class SupportSampler:
    """One epoch's batches, as the official ``FSAD_Dataset_train.shuffle_dataset``: per group
    the images in a seeded random order, cut into batches of ``batch_size`` queries; each
    query gets ``k`` supports drawn uniformly from the group's other images (with
    replacement); the batches of all groups in a seeded random order. A last batch of a single
    query joins the batch before it: BatchNorm in training mode cannot normalise one value
    per channel, which a lone query gives on small feature grids."""

    def __init__(self, images: NormalImages, batch_size: int, k: int, seed: int) -> None:
        if batch_size < 1 or k < 1:
            raise ValueError(f"batch size and k must be at least 1, got {batch_size}, {k}")
        self.groups = {g: v for g, v in images.by_group().items() if len(v) >= 2}
        self.batch_size = batch_size
        self.k = k
        self._rng = np.random.default_rng(seed)

    def epoch(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(queries (B,), supports (B, k))] as image indices."""
        batches = []
        for members in self.groups.values():
            order = self._rng.permutation(members)
            cuts = list(range(0, len(order), self.batch_size))
            if len(cuts) > 1 and len(order) - cuts[-1] == 1:
                cuts.pop()  # a last lone query joins the batch before it (see the docstring)
            for start, end in zip(cuts, cuts[1:] + [len(order)]):
                queries = order[start:end]
                supports = np.empty((len(queries), self.k), dtype=np.int64)
                for i, q in enumerate(queries):
                    others = members[members != q]
                    supports[i] = others[self._rng.integers(0, len(others), size=self.k)]
                batches.append((queries, supports))
        return [batches[i] for i in self._rng.permutation(len(batches))]


@dataclass(frozen=True)
class RegadSettings:
    epochs: int = 50  # official --epochs
    lr: float = 1e-4  # official train.py --lr
    momentum: float = 0.9  # official --momentum
    weight_decay: float = 0.0  # official: none
    log_every: int = 20
    #: keep the CNN's BatchNorm layers in eval mode (their ImageNet running statistics); the
    #: official code trains them in batch-statistics mode (False)
    freeze_bn: bool = False


def cnn_batch_norms(model: RegadModel) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of the CNN's stages (not those of the transformers or heads)."""
    return [m for name, m in model.backbone.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and not name.split(".")[0].startswith("stn")]


def set_train_mode(model: RegadModel, freeze_bn: bool) -> None:
    """``model.train()``; with ``freeze_bn`` the CNN's BatchNorm layers stay in eval mode, so
    they normalise with, and keep, their initial running statistics (their scale and shift
    are still trained)."""
    model.train()
    if freeze_bn:
        for bn in cnn_batch_norms(model):
            bn.eval()


def epoch_lr(lr: float, epoch: int, epochs: int) -> float:
    """Cosine over epochs, full ``lr`` in epoch 1: lr·½(1 + cos(π(epoch − 1)/epochs))."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def fit_regad(model: RegadModel, images: NormalImages, sampler: SupportSampler,
              settings: RegadSettings, device: torch.device | str = "cpu") -> TrainLog:
    """Train ``model`` in place (left in eval mode); returns the log (one row per step)."""
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    log = TrainLog()
    start, step = time.perf_counter(), 0
    for epoch in range(1, settings.epochs + 1):
        lr = epoch_lr(settings.lr, epoch, settings.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_train_mode(model, settings.freeze_bn)
        epoch_start, losses = time.perf_counter(), []
        for queries, supports in sampler.epoch():
            t0 = time.perf_counter()
            q = normalise(images.pixels[torch.from_numpy(queries)].to(device),
                          model.mean, model.std)
            s = normalise(images.pixels[torch.from_numpy(supports.reshape(-1))].to(device),
                          model.mean, model.std)
            loss = model.siamese_loss(q, s.view(len(queries), sampler.k, *s.shape[1:]))
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"the RegAD training loss became {value}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(value)
            now = time.perf_counter()
            log.add_step(epoch=epoch, step=step, loss=value, lr=lr, wall_time_s=now - start,
                         step_time_s=now - t0)
            if step % settings.log_every == 0:
                LOG.info("Step %d (epoch %d): loss %.4f, lr %.2e", step, epoch, value, lr)
        mean_loss = sum(losses) / len(losses) if losses else math.nan
        LOG.info("Epoch %d/%d: mean loss %.4f in %.1f s", epoch, settings.epochs, mean_loss,
                 time.perf_counter() - epoch_start)
        log.add_epoch(epoch=epoch, steps=len(losses), mean_loss=mean_loss,
                      epoch_time_s=time.perf_counter() - epoch_start,
                      wall_time_s=time.perf_counter() - start)
    model.eval()
    return log
