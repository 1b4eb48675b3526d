"""The training loop with a fake batch source: schedule, best-epoch choice, failures."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from pipeline.model.backbone import ImageFeatures
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLModel
from pipeline.train.data import EpisodeSampler, TrainingSet
from pipeline.train.loop import LoopSettings, fit
from tests.model.helpers import geometry


def _index() -> pd.DataFrame:
    rows = [(f"n{i}", 0) for i in range(6)] + [(f"a{i}", 1) for i in range(4)]
    frame = pd.DataFrame(rows, columns=["image_id", "label"])
    frame["label"] = frame["label"].astype("Int64")
    frame["role"] = "query"
    frame["dataset"], frame["category"] = "d", "c"
    frame["image_uri"] = "mem://" + frame["image_id"]
    frame["content_hash"] = "h" + frame["image_id"]
    return frame


class FakeBatches:
    """Random but fixed features per image; anomalies have a shifted embedding."""

    def __init__(self, data: TrainingSet, geo) -> None:
        g = torch.Generator().manual_seed(0)
        n = len(data.index)
        self.tokens = torch.randn(n, geo.num_layers, geo.num_patches, geo.token_width, generator=g)
        self.embeds = torch.randn(n, geo.embed_dim, generator=g)
        self.embeds[data.anomalous] += 2.0
        self.calls = 0

    def _feats(self, positions) -> ImageFeatures:
        return ImageFeatures(self.tokens[list(positions)], self.embeds[list(positions)])

    def __call__(self, episodes):
        self.calls += 1
        return (self._feats([e.query for e in episodes]),
                [self._feats(e.prompts) for e in episodes],
                torch.tensor([float(e.label) for e in episodes]))


def _run(settings: LoopSettings, aurocs=None, seed: int = 0):
    geo = geometry()
    data = TrainingSet(_index(), k=2)
    scorer = InCTRLModel(geo, InCTRLHeads.seeded(geo.embed_dim, geo.num_patches, seed))
    g = torch.Generator().manual_seed(1)
    text = {"c": torch.nn.functional.normalize(torch.randn(2, geo.embed_dim, generator=g), dim=-1)}
    snapshots = []

    def validate(s):
        snapshots.append(copy.deepcopy(s.heads.state_dict()))
        value = aurocs[len(snapshots) - 1]
        return {"auroc": value, "auprc": value, "auroc_pooled": value, "auprc_pooled": value,
                "categories": 1.0}, pd.DataFrame({"epoch": [len(snapshots) - 1]})

    batches = FakeBatches(data, geo)
    result = fit(scorer, EpisodeSampler(data, 4, seed), batches, text, settings,
                 validate if aurocs is not None else None)
    return result, snapshots, batches


def test_cosine_schedule_decays_to_zero_and_constant_stays():
    result, _, batches = _run(LoopSettings(2, 5, lr=1e-2, lr_schedule="cosine"))
    lrs = [s["lr"] for s in result.log.steps]
    assert lrs[0] == pytest.approx(1e-2) and lrs == sorted(lrs, reverse=True)
    assert lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert batches.calls == 10 and [s["step"] for s in result.log.steps] == list(range(1, 11))
    result, _, _ = _run(LoopSettings(1, 4, lr=1e-2))
    assert {s["lr"] for s in result.log.steps} == {1e-2}


def test_the_best_validation_epoch_is_kept():
    result, snapshots, _ = _run(LoopSettings(3, 3), aurocs=[0.95, 0.7, 0.9, 0.8])
    # Epoch 0 (untrained) is logged but never kept, even with the highest AUROC.
    assert result.best_epoch == 2
    assert [e["val_auroc"] for e in result.log.epochs] == [0.95, 0.7, 0.9, 0.8]
    for name, value in result.heads.state_dict().items():
        assert torch.equal(value, snapshots[2][name]), name
    assert not all(torch.equal(v, snapshots[3][n]) for n, v in result.heads.state_dict().items())
    for name, value in result.last_heads.state_dict().items():
        assert torch.equal(value, snapshots[3][name]), name
    assert result.validation_scores["epoch"].tolist() == [2]
    assert not result.heads.training


def test_without_usable_validation_the_last_epoch_is_kept(caplog):
    result, snapshots, _ = _run(LoopSettings(2, 2), aurocs=[math.nan] * 3)
    assert result.best_epoch == 2 and "keeping the last epoch" in caplog.text
    for name, value in result.heads.state_dict().items():
        assert torch.equal(value, snapshots[2][name])


def test_same_seed_same_losses():
    a, _, _ = _run(LoopSettings(1, 6), seed=3)
    b, _, _ = _run(LoopSettings(1, 6), seed=3)
    assert a.log.losses() == b.log.losses()
    c, _, _ = _run(LoopSettings(1, 6), seed=4)
    assert a.log.losses() != c.log.losses()


def test_a_non_finite_loss_stops_training():
    geo = geometry()
    data = TrainingSet(_index(), k=2)
    scorer = InCTRLModel(geo, InCTRLHeads.seeded(geo.embed_dim, geo.num_patches, 0))
    batches = FakeBatches(data, geo)
    batches.embeds[:] = float("nan")
    text = {"c": torch.nn.functional.normalize(torch.randn(2, geo.embed_dim), dim=-1)}
    with pytest.raises(FloatingPointError):
        fit(scorer, EpisodeSampler(data, 4, 0), batches, text, LoopSettings(1, 2))
