"""Validation draws references like the scoring job and averages metrics over categories."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.core.manifest import normalize_row
from pipeline.core.sampling import draw_references
from pipeline.train.validate import ValidationSet, validation_metrics


def _index(rows: list[tuple]) -> pd.DataFrame:
    """rows: (image_id, category, role, label)."""
    frame = pd.DataFrame(rows, columns=["image_id", "category", "role", "label"])
    frame["dataset"] = "d"
    frame["image_uri"] = "mem://" + frame["image_id"]
    frame["content_hash"] = "h" + frame["image_id"]
    frame["label"] = frame["label"].astype("Int64")
    return frame


def test_references_are_the_scoring_jobs_draw_and_only_labelled_queries_count():
    rows = [(f"a-r{i}", "a", "reference", 0) for i in range(7)]
    rows += [("a-r-bad", "a", "reference", 1), ("a-r-unl", "a", "reference", None)]
    rows += [("a-q0", "a", "query", 0), ("a-q1", "a", "query", 1), ("a-q2", "a", "query", None)]
    rows += [("b-q0", "b", "query", 1)]  # no reference: skipped
    index = _index(rows)
    for seed in (0, 1, 2):
        vset = ValidationSet(index, k=3, seed=seed)
        assert [g.category for g in vset.groups] == ["a"]
        candidates = [normalize_row(dict(r, role="reference"))
                      for r in index[index["image_id"].str.startswith("a-r")
                                     & (index["image_id"] != "a-r-bad")].to_dict("records")]
        expected = [r.image_id for r in draw_references(candidates, seed, 3)]
        assert list(vset.groups[0].reference_ids) == expected
        assert "a-r-bad" not in vset.groups[0].reference_ids
        assert vset.groups[0].queries["image_id"].tolist() == ["a-q0", "a-q1"]


def test_metrics_average_categories_and_skip_single_class_ones():
    scores = pd.DataFrame({
        "dataset": "d",
        "category": ["a"] * 4 + ["b"] * 4 + ["c"] * 2,
        "label": [0, 0, 1, 1, 0, 1, 0, 1, 1, 1],
        "final_score": [0.1, 0.2, 0.3, 0.4, 0.4, 0.3, 0.1, 0.2, 0.5, 0.6],
    })
    m = validation_metrics(scores)
    assert m["auroc"] == pytest.approx((1.0 + 0.5) / 2)  # c has anomalies only
    assert m["categories"] == 2
    assert 0.0 < m["auroc_pooled"] < 1.0


def test_metrics_of_nothing_are_nan():
    m = validation_metrics(pd.DataFrame({"dataset": [], "category": [], "label": [],
                                         "final_score": []}))
    assert math.isnan(m["auroc"]) and math.isnan(m["auroc_pooled"])
