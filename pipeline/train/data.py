"""Training examples from the feature index: balanced query batches with fresh few-shot prompts.

Every labelled row of the auxiliary manifest is a query. Its k prompts are normal images of the
same dataset and category, drawn anew at every step and never the query itself (no row with the
query's content hash). Batches hold as many normal as anomalous queries. Features are read
lazily from the disk cache through a small, byte-bounded LRU, so the set need not fit in RAM.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pipeline.core.feature_cache import FeatureCache
from pipeline.core.manifest import ManifestRow, RowError
from pipeline.model.backbone import ImageFeatures
from pipeline.model.scorers.clip import EMBEDS, TOKENS

LOG = logging.getLogger(__name__)

# The extraction job's tables: the cached image (content hash) of every usable row, and the
# rows that could not be used.
INDEX_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("category", pa.string()),
    pa.field("role", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("content_hash", pa.string()),
])

EXTRACT_ERROR_SCHEMA = pa.schema([
    pa.field("split", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("category", pa.string()),
    pa.field("role", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
])

def index_record(row: ManifestRow, content_hash: str) -> dict:
    """The index row of one image whose features are in the cache."""
    return {"image_id": row.image_id, "image_uri": row.image_uri, "dataset": row.dataset,
            "category": row.category, "role": row.role, "label": row.label,
            "content_hash": content_hash}


def extract_error_record(error: RowError, split: str) -> dict:
    """The extraction job's error row of one unusable manifest row."""
    return dict(error.to_record(), split=split)

INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)

Group = tuple[str, str]  # (dataset, category)


class TrainingDataError(ValueError):
    """The auxiliary data cannot train the heads (no anomalies, no normal prompts, ...)."""


class MissingFeaturesError(RuntimeError):
    """An image listed in the index has no features in the cache."""


@dataclass(frozen=True)
class Episode:
    """One training example: positions in the index of the query and of its prompts."""

    query: int
    prompts: tuple[int, ...]
    label: int


class FeatureStore:
    """Reads per-image CLIP features (InCTRL's ``tokens`` and ``embeds``) from a FeatureCache,
    keeping recent ones in a bounded LRU."""

    def __init__(self, cache: FeatureCache, max_bytes: int = 256 << 20) -> None:
        self._cache = cache
        self._max_bytes = max_bytes
        self._lru: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._bytes = 0
        self.reads = 0

    @staticmethod
    def _size(f: ImageFeatures) -> int:
        return f.tokens.nelement() * f.tokens.element_size() + \
            f.embeds.nelement() * f.embeds.element_size()

    def get(self, content_hash: str) -> ImageFeatures:
        """One image's features, (1, ...) tensors on the CPU."""
        feats = self._lru.get(content_hash)
        if feats is not None:
            self._lru.move_to_end(content_hash)
            return feats
        state = self._cache.get(content_hash)
        if state is None:
            raise MissingFeaturesError(
                f"no cached features for image {content_hash} under {self._cache.root}; "
                "was the cache moved or cleaned after extraction?")
        feats = ImageFeatures(state[TOKENS], state[EMBEDS])
        self.reads += 1
        size = self._size(feats)
        if size <= self._max_bytes:
            self._lru[content_hash] = feats
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, old = self._lru.popitem(last=False)
                self._bytes -= self._size(old)
        return feats

    def stack(self, hashes: Sequence[str]) -> ImageFeatures:
        """Features of several images stacked in order: tokens (n, layers, patches, width)."""
        return ImageFeatures.cat([self.get(h) for h in hashes])


def read_index(path: str) -> pd.DataFrame:
    """The extraction index (Parquet) as a frame with a nullable integer label."""
    frame = pd.read_parquet(path)
    missing = [c for c in INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise TrainingDataError(f"feature index {path} lacks columns {missing}")
    frame = frame.sort_values(["dataset", "category", "image_id", "role"], kind="stable")
    frame["label"] = frame["label"].astype("Int64")
    return frame.reset_index(drop=True)


def is_prompt_candidate(role: pd.Series, label: pd.Series) -> pd.Series:
    """Normal images usable as prompts: label 0, or an unlabelled reference row."""
    return (label == 0).fillna(False) | ((role == "reference") & label.isna())


class TrainingSet:
    """Queries (labelled rows) and per-group prompt pools of one auxiliary index.

    Pools are de-duplicated by content hash. Queries whose group has no normal image other
    than themselves cannot be given prompts and are left out, with a warning.
    """

    def __init__(self, index: pd.DataFrame, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.index = index.reset_index(drop=True)
        self.k = k
        self.hashes = self.index["content_hash"].to_numpy(dtype=object)
        labels = self.index["label"]
        groups = list(zip(self.index["dataset"], self.index["category"]))
        self.groups: list[Group] = groups

        candidate = is_prompt_candidate(self.index["role"], labels).to_numpy()
        pools: dict[Group, list[int]] = {}
        # slot[pos]: where the row's content sits in its group's pool, -1 when not in it.
        slot_of: dict[tuple[Group, str], int] = {}
        for pos in np.flatnonzero(candidate):
            key = (groups[pos], self.hashes[pos])
            if key not in slot_of:
                pool = pools.setdefault(groups[pos], [])
                slot_of[key] = len(pool)
                pool.append(int(pos))
        self.pools = {g: np.asarray(p, dtype=np.int64) for g, p in pools.items()}
        self.slots = np.array([slot_of.get((g, h), -1) for g, h in zip(groups, self.hashes)],
                              dtype=np.int64)
        pool_sizes = np.array([len(self.pools.get(g, ())) for g in groups], dtype=np.int64)
        usable = pool_sizes - (self.slots >= 0) >= 1

        labelled = labels.notna().to_numpy()
        dropped = labelled & ~usable
        if dropped.any():
            lost = sorted({groups[p] for p in np.flatnonzero(dropped)})
            LOG.warning("Leaving out %d labelled rows of %d group(s) without another normal image "
                        "to serve as a prompt, e.g. %s", int(dropped.sum()), len(lost), lost[0])
        label_values = labels.fillna(-1).to_numpy(dtype=np.int64)
        self.normal = np.flatnonzero(labelled & usable & (label_values == 0))
        self.anomalous = np.flatnonzero(labelled & usable & (label_values == 1))
        if len(self.anomalous) == 0:
            raise TrainingDataError(
                "the training manifest has no usable anomalous (label 1) image; the heads learn "
                "from normal and anomalous queries")
        if len(self.normal) == 0:
            raise TrainingDataError(
                "the training manifest has no usable normal (label 0) query image")
        small = sorted(g for g, p in self.pools.items() if len(p) <= k)
        if small:
            LOG.warning("%d group(s) have at most k=%d normal images, so their queries get fewer "
                        "than k prompts, e.g. %s", len(small), k, small[0])
        LOG.info("Training set: %d normal and %d anomalous queries in %d group(s)",
                 len(self.normal), len(self.anomalous), len(self.pools))

    def prompt_candidates(self, pos: int) -> np.ndarray:
        """Index positions that may prompt the query at ``pos``: same group, other content."""
        pool = self.pools[self.groups[pos]]
        slot = self.slots[pos]
        return pool if slot < 0 else np.delete(pool, slot)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.index["category"]))


class _Cycle:
    """Endless passes over ``items``, each in a fresh seeded random order."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self._items = items
        self._rng = rng
        self._order = np.empty(0, dtype=np.int64)
        self._next = 0

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._next >= len(self._order):
                self._order = self._rng.permutation(self._items)
                self._next = 0
            grab = self._order[self._next:self._next + n - len(out)]
            self._next += len(grab)
            out.extend(int(x) for x in grab)
        return out


class EpisodeSampler:
    """Balanced batches: half normal, half anomalous queries, each with k fresh prompts.

    Queries of each class are taken in seeded random passes (every query once per pass);
    prompts are drawn without replacement from the query's group for every step.
    """

    def __init__(self, data: TrainingSet, batch_size: int, seed: int) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch size must be even and at least 2 (half normal, half "
                             f"anomalous; BatchNorm needs 2), got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._normal = _Cycle(data.normal, self._rng)
        self._anomalous = _Cycle(data.anomalous, self._rng)

    def _prompts(self, pos: int) -> tuple[int, ...]:
        data = self.data
        pool = data.pools[data.groups[pos]]
        slot = data.slots[pos]
        n = len(pool) - (slot >= 0)
        picked = self._rng.choice(n, size=min(data.k, n), replace=False)
        if slot >= 0:
            picked = picked + (picked >= slot)  # skip the query's own slot
        return tuple(sorted(int(p) for p in pool[picked]))

    def next_batch(self) -> list[Episode]:
        half = self.batch_size // 2
        queries = [(p, 0) for p in self._normal.take(half)] + \
                  [(p, 1) for p in self._anomalous.take(half)]
        return [Episode(pos, self._prompts(pos), label) for pos, label in queries]


def batch_features(store: FeatureStore, data: TrainingSet, episodes: Sequence[Episode],
                   device: torch.device | str = "cpu",
                   ) -> tuple[ImageFeatures, list[ImageFeatures], torch.Tensor]:
    """(query features (B, ...), each episode's prompt features (k, ...), labels (B,))."""
    h = data.hashes
    queries = store.stack([h[e.query] for e in episodes]).to(device)
    prompts = [store.stack([h[p] for p in e.prompts]).to(device) for e in episodes]
    labels = torch.tensor([e.label for e in episodes], dtype=torch.float32, device=device)
    return queries, prompts, labels
