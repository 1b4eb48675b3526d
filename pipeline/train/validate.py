"""Validation: score a held-out manifest from cached features exactly as the scoring job does.

References are the k normal reference rows of each (dataset, category) that the scoring job's
seeded sampler draws (``sampler_rank``), queries are the labelled query rows; scores come from
``InCTRLModel.forward`` in eval mode. AUROC and AUPRC of the final score are computed per
category and averaged (the paper's convention), and over all queries pooled.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from pipeline.core.metrics import image_metrics
from pipeline.core.sampling import sampler_rank
from pipeline.model.inctrl import InCTRLModel
from pipeline.train.data import FeatureStore

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationGroup:
    """One (dataset, category) of the held-out set: its drawn references and its queries."""

    dataset: str
    category: str
    reference_ids: tuple[str, ...]
    reference_hashes: tuple[str, ...]
    queries: pd.DataFrame  # image_id, label, content_hash


class ValidationSet:
    """The held-out index grouped for scoring, with references drawn by the scoring sampler."""

    def __init__(self, index: pd.DataFrame, k: int, seed: int) -> None:
        self.k, self.seed = k, seed
        self.groups: list[ValidationGroup] = []
        skipped = []
        for (dataset, category), rows in index.groupby(["dataset", "category"], sort=True):
            refs = rows[(rows["role"] == "reference") & (rows["label"] != 1).fillna(True)]
            ranked = sorted(
                zip(refs["image_id"], refs["image_uri"], refs["content_hash"]),
                key=lambda r: (sampler_rank(seed, dataset, category, r[0]), r[1]),
            )[:k]
            queries = rows[(rows["role"] == "query") & rows["label"].notna()]
            if queries.empty:
                continue
            if not ranked:
                skipped.append((dataset, category))
                continue
            self.groups.append(ValidationGroup(
                dataset, category,
                reference_ids=tuple(r[0] for r in ranked),
                reference_hashes=tuple(r[2] for r in ranked),
                queries=queries[["image_id", "label", "content_hash"]].reset_index(drop=True),
            ))
        if skipped:
            LOG.warning("Validation skips %d group(s) without a normal reference image, e.g. %s",
                        len(skipped), skipped[0])
        if not self.groups:
            LOG.warning("The validation manifest has no labelled query with references")

    @property
    def categories(self) -> list[str]:
        return sorted({g.category for g in self.groups})

    def __len__(self) -> int:
        return sum(len(g.queries) for g in self.groups)


@torch.no_grad()
def score_validation(scorer: InCTRLModel, store: FeatureStore, vset: ValidationSet,
                     text_features: Mapping[str, torch.Tensor], batch_size: int,
                     device: torch.device | str = "cpu") -> pd.DataFrame:
    """Every validation query's scores: image_id, dataset, category, label and score columns."""
    was_training = scorer.training
    scorer.eval()
    frames = []
    try:
        for group in vset.groups:
            refs = scorer.prepare_references(store.stack(group.reference_hashes).to(device))
            text = text_features[group.category].to(device)
            hashes = group.queries["content_hash"].tolist()
            parts = []
            for start in range(0, len(hashes), batch_size):
                feats = store.stack(hashes[start:start + batch_size]).to(device)
                comps = scorer(feats, refs, text)
                parts.append(torch.stack([comps.final, comps.fine, comps.holistic,
                                          comps.image_residual, comps.text_prior], 1).cpu())
            values = torch.cat(parts).double().numpy()
            frame = group.queries[["image_id", "label"]].copy()
            frame.insert(0, "category", group.category)
            frame.insert(0, "dataset", group.dataset)
            for i, name in enumerate(("final_score", "fine_score", "holistic_score",
                                      "image_residual_score", "text_prior_score")):
                frame[name] = values[:, i]
            frames.append(frame)
    finally:
        scorer.train(was_training)
    if not frames:
        return pd.DataFrame(columns=["dataset", "category", "image_id", "label", "final_score"])
    return pd.concat(frames, ignore_index=True)


def validation_metrics(scores: pd.DataFrame, column: str = "final_score") -> dict[str, float]:
    """Category-mean and pooled AUROC / AUPRC of ``column`` (NaN where undefined)."""
    per_group = []
    for _, g in scores.groupby(["dataset", "category"], sort=True):
        m = image_metrics(g["label"].to_numpy(dtype=float), g[column].to_numpy(dtype=float))
        if not math.isnan(m["auroc"]):
            per_group.append(m)
    pooled = image_metrics(scores["label"].to_numpy(dtype=float),
                           scores[column].to_numpy(dtype=float)) if len(scores) else \
        {"auroc": math.nan, "auprc": math.nan}
    return {
        "auroc": float(np.mean([m["auroc"] for m in per_group])) if per_group else math.nan,
        "auprc": float(np.mean([m["auprc"] for m in per_group])) if per_group else math.nan,
        "auroc_pooled": pooled["auroc"],
        "auprc_pooled": pooled["auprc"],
        "categories": float(len(per_group)),
    }
