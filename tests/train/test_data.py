"""Training examples: balanced batches, prompts from the query's group, never the query."""
from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from pipeline.core.feature_cache import FeatureCache
from pipeline.model.backbone import ImageFeatures, tiny_spec
from pipeline.train.data import (EpisodeSampler, FeatureStore, MissingFeaturesError,
                                 TrainingDataError, TrainingSet)


def _index(rows: list[tuple]) -> pd.DataFrame:
    """rows: (image_id, dataset, category, role, label, content_hash)."""
    frame = pd.DataFrame(rows, columns=["image_id", "dataset", "category", "role", "label",
                                        "content_hash"])
    frame["image_uri"] = "mem://" + frame["image_id"]
    frame["label"] = frame["label"].astype("Int64")
    return frame


def _group(dataset: str, category: str, refs: int, good: int, bad: int) -> list[tuple]:
    p = f"{dataset}-{category}"
    return ([(f"{p}-r{i}", dataset, category, "reference", 0, f"h{p}-r{i}") for i in range(refs)]
            + [(f"{p}-g{i}", dataset, category, "query", 0, f"h{p}-g{i}") for i in range(good)]
            + [(f"{p}-b{i}", dataset, category, "query", 1, f"h{p}-b{i}") for i in range(bad)])


@pytest.fixture()
def two_groups() -> TrainingSet:
    rows = _group("d1", "a", 3, 2, 3) + _group("d2", "a", 2, 1, 2)
    # The same image listed twice, as a reference and as a normal query: one content hash.
    rows.append(("d1-a-dup", "d1", "a", "query", 0, "hd1-a-r0"))
    # An unlabelled query is no training example and no prompt; an unlabelled reference is.
    rows.append(("d1-a-unl", "d1", "a", "query", None, "hd1-a-unl"))
    rows.append(("d2-a-unlref", "d2", "a", "reference", None, "hd2-a-unlref"))
    return TrainingSet(_index(rows), k=2)


def test_every_labelled_row_is_a_query_and_normals_are_prompts(two_groups):
    data = two_groups
    ids = data.index["image_id"]
    normal, anomalous = set(ids[data.normal]), set(ids[data.anomalous])
    assert anomalous == {"d1-a-b0", "d1-a-b1", "d1-a-b2", "d2-a-b0", "d2-a-b1"}
    assert normal == {"d1-a-r0", "d1-a-r1", "d1-a-r2", "d1-a-g0", "d1-a-g1", "d1-a-dup",
                      "d2-a-r0", "d2-a-r1", "d2-a-g0"}
    pools = {g: set(ids[p]) for g, p in data.pools.items()}
    # Pools hold each content once (the duplicate row is not a second prompt).
    assert pools[("d1", "a")] == {"d1-a-r0", "d1-a-r1", "d1-a-r2", "d1-a-g0", "d1-a-g1"}
    assert pools[("d2", "a")] == {"d2-a-r0", "d2-a-r1", "d2-a-g0", "d2-a-unlref"}


def test_batches_are_balanced_and_prompts_come_from_the_query_group(two_groups):
    data = two_groups
    sampler = EpisodeSampler(data, batch_size=8, seed=0)
    for _ in range(20):
        batch = sampler.next_batch()
        assert [e.label for e in batch] == [0] * 4 + [1] * 4
        for e in batch:
            assert int(data.index["label"][e.query]) == e.label
            assert len(e.prompts) == 2 and len(set(e.prompts)) == 2
            for p in e.prompts:
                assert data.groups[p] == data.groups[e.query]
                assert data.hashes[p] != data.hashes[e.query]  # never the query itself
                assert data.index["label"].fillna(0)[p] == 0


def test_prompts_are_drawn_anew_at_every_step(two_groups):
    sampler = EpisodeSampler(two_groups, batch_size=2, seed=0)
    drawn: dict[int, set] = {}
    for _ in range(200):
        for e in sampler.next_batch():
            drawn.setdefault(e.query, set()).add(e.prompts)
    # d1/a has 5 distinct normal images: a query outside the pool has C(5,2) = 10 prompt sets.
    b0 = int(two_groups.index.index[two_groups.index["image_id"] == "d1-a-b0"][0])
    assert len(drawn[b0]) == 10


def test_each_pass_takes_every_query_once(two_groups):
    data = two_groups
    sampler = EpisodeSampler(data, batch_size=2, seed=3)
    first_pass = [sampler.next_batch()[1].query for _ in range(len(data.anomalous))]
    assert sorted(first_pass) == sorted(data.anomalous.tolist())


def test_same_seed_same_batches_other_seed_other_batches(two_groups):
    def draws(seed):
        s = EpisodeSampler(two_groups, batch_size=4, seed=seed)
        return [s.next_batch() for _ in range(10)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_fewer_normals_than_k_gives_what_there_is_and_lone_normals_are_left_out(caplog):
    # 'lone' has one normal image: it can prompt the anomaly, but nothing can prompt it.
    rows = _group("d", "few", 1, 1, 2) + _group("d", "lone", 0, 1, 1)
    with caplog.at_level(logging.WARNING):
        data = TrainingSet(_index(rows), k=4)
    assert "Leaving out 1 labelled rows" in caplog.text
    ids = data.index["image_id"]
    assert set(ids[data.normal]) == {"d-few-r0", "d-few-g0"}
    assert set(ids[data.anomalous]) == {"d-few-b0", "d-few-b1", "d-lone-b0"}
    sampler = EpisodeSampler(data, batch_size=2, seed=0)
    for _ in range(6):
        normal, anomalous = sampler.next_batch()
        assert len(normal.prompts) == 1  # the other normal image of 'few'
        assert len(anomalous.prompts) == (1 if ids[anomalous.query] == "d-lone-b0" else 2)


@pytest.mark.parametrize("rows, message", [
    (_group("d", "a", 3, 2, 0), "anomalous"),
    ([("x", "d", "a", "query", 1, "hx"), ("y", "d", "a", "reference", None, "hy")], "normal"),
])
def test_unusable_training_sets_are_refused(rows, message):
    with pytest.raises(TrainingDataError, match=message):
        TrainingSet(_index(rows), k=2)


@pytest.mark.parametrize("batch_size", [0, 1, 3])
def test_odd_or_tiny_batches_are_refused(two_groups, batch_size):
    with pytest.raises(ValueError, match="even"):
        EpisodeSampler(two_groups, batch_size=batch_size, seed=0)


def test_feature_store_reads_lazily_and_bounds_its_memory(tmp_path):
    cache = FeatureCache(str(tmp_path), tiny_spec())
    feats = {f"h{i}": ImageFeatures(torch.full((1, 2, 4, 8), float(i)),
                                    torch.full((1, 8), float(i))) for i in range(4)}
    for h, f in feats.items():
        cache.put(h, {"tokens": f.tokens, "embeds": f.embeds})
    one = 2 * 4 * 8 * 4 + 8 * 4  # bytes of one image's tensors
    store = FeatureStore(cache, max_bytes=2 * one)
    stacked = store.stack(["h0", "h1", "h0"])
    assert stacked.tokens.shape == (3, 2, 4, 8)
    assert torch.equal(stacked.embeds[:, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert store.reads == 2  # h0 came from memory the second time
    store.stack(["h2", "h3", "h0"])  # h0 was evicted by h2 and h3
    assert store.reads == 5
    with pytest.raises(MissingFeaturesError, match="nope"):
        store.get("nope")
