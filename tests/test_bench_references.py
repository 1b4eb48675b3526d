"""bench/references.py at toy size: random CNN weights, one photo category, a handful of images."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("skimage")

from bench import references  # noqa: E402
from pipeline.model.scorers.references import cosine_distances, k_medoids  # noqa: E402

TINY = ["--sets", "photos", "--photo-categories", "cat", "--photo-train", "4",
        "--photo-test-good", "2", "--photo-test-anomalous", "2", "--photo-size", "48",
        "--k-list", "1,2", "--draws", "2", "--scorer", "spade,padim",
        "--cnn-weights", "random:0", "--batch-size", "8", "--workers", "2"]


def test_bench_tabulates_representative_against_random_draws(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert references.main([*TINY, "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("| scorer | k | representative | k-center | random mean | random worst | "
            "random best | random std | ≥ mean? | ≥ worst? |") in text
    res = json.loads(out.read_text())
    entry = res["sets"]["photos"]
    assert entry["shape"] == {"datasets": 1, "categories": 1, "pool": 4, "queries": 12,
                              "anomalous": 10}  # 2 per defect kind
    table = pd.DataFrame(entry["table"])
    assert list(zip(table["scorer"], table["k"])) == [("spade", 1), ("spade", 2),
                                                      ("padim", 1), ("padim", 2)]
    assert (table["random_worst"] <= table["random_mean"]).all()
    assert (table["random_mean"] <= table["random_best"]).all()
    records = pd.DataFrame(entry["records"])
    assert set(records["selection"]) == {"representative", "k-center", "random 0", "random 1"}
    assert (records["references"].map(len) == records["k"]).all()
    assert entry["per_category_counts"]["representative"]["cells"] == 4


def test_summary_flags_compare_with_the_random_mean_and_worst():
    rows = [("representative", 0.7), ("k-center", 0.5), ("random 0", 0.6), ("random 1", 0.9),
            ("random 2", 0.8)]
    records = pd.DataFrame([{"dataset": "d", "category": "c", "scorer": "padim", "k": 1,
                             "selection": s, "auroc": a} for s, a in rows])
    row = references.summarize(records, ["padim"]).iloc[0]
    assert row["random_mean"] == pytest.approx(0.7667, abs=1e-4)
    assert (row["random_worst"], row["random_best"]) == (0.6, 0.9)
    assert not row["ge_mean"] and row["ge_worst"]


def test_spade_image_score_does_not_depend_on_the_map_levels():
    from pipeline.model.scorers.spade import Spade

    g = torch.Generator().manual_seed(0)

    def feats(n):
        return {"pooled": torch.randn(n, 8, generator=g),
                **{f"s{s}": torch.randn(n, 4, 32 // s, 32 // s, generator=g) for s in (4, 8, 16)}}

    refs, queries = feats(3), feats(5)
    full = Spade()
    cut = references.image_level({"spade": full})["spade"]
    assert cut.strides == (16,)
    assert torch.equal(full.score(queries, full.build_memory(refs)).score,
                       cut.score(queries, cut.build_memory(refs)).score)


def test_k_center_picks_the_outlier_that_k_medoids_leaves_out():
    # a spread-out main cluster (splitting it saves much) and one odd image
    g = torch.Generator().manual_seed(2)
    main = torch.tensor([1.0, 0, 0, 0]) + 0.3 * torch.randn(30, 4, generator=g)
    odd = torch.tensor([[0.3, 1.0, 0.0, 0.0]])
    x = torch.nn.functional.normalize(torch.cat([main, odd]).double(), dim=-1)
    dist = cosine_distances(x)
    assert 30 in references.k_center(dist, 2).tolist()
    assert 30 not in k_medoids(dist, 2).tolist()
