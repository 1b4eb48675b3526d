"""Tests for pipeline.core.decision_metrics: realized false-alarm rate, recall and anomaly rate
at the decision, counted by hand on a small table."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.core.decision_metrics import (DECISION_COLUMNS, add_decision_metrics,
                                            short_calibration, summarize_decisions)
from pipeline.core.metrics import summarize_scores, summary_to_markdown

ALPHA = 0.05


def _rows() -> pd.DataFrame:
    rows = []

    def add(category, seed, label, flagged, n, threshold):
        rows.append({"dataset": "line", "scorer": "patchcore", "category": category, "k": 4,
                     "seed": seed, "label": label, "final_score": 0.5 + 0.1 * len(rows),
                     "is_anomalous": flagged, "calibration_size": n,
                     "decision_threshold": threshold, "false_alarm_rate": ALPHA})

    # Category a: 4 normal, 2 anomalous, 1 unlabelled query, decided in both seeds.
    for seed, normal, anomalous, unlabelled, n, t in (
            (0, [True, False, False, False], [True, False], True, 20, 1.0),
            (1, [False, False, False, False], [True, True], False, 22, 1.2)):
        for f in normal:
            add("a", seed, 0, f, n, t)
        for f in anomalous:
            add("a", seed, 1, f, n, t)
        add("a", seed, None, unlabelled, n, t)
    # Category b: 3 calibration images, no decision.
    for seed in (0, 1):
        for label in (0, 0, 0, 1, 1, 1):
            add("b", seed, label, None, 3, None)
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int64")
    frame["is_anomalous"] = frame["is_anomalous"].astype("boolean")
    return frame


def _row(frame: pd.DataFrame, level: str, category: str) -> dict:
    found = frame[(frame["level"] == level) & (frame["category"] == category)]
    assert len(found) == 1, (level, category)
    return found.iloc[0].to_dict()


@pytest.fixture(scope="module")
def decisions() -> pd.DataFrame:
    return summarize_decisions(_rows())


def test_category_rates_are_per_seed_then_mean_and_population_std(decisions) -> None:
    a = _row(decisions, "category", "a")
    # seed 0: FP 1 of 4 normal, TP 1 of 2 anomalous, 3 flagged of 7; seed 1: 0/4, 2/2, 2/7.
    assert a["realized_false_alarm_rate_mean"] == pytest.approx(0.125)
    assert a["realized_false_alarm_rate_std"] == pytest.approx(0.125)
    assert a["recall_at_decision_mean"] == pytest.approx(0.75)
    assert a["recall_at_decision_std"] == pytest.approx(0.25)
    assert a["anomaly_rate_mean"] == pytest.approx((3 / 7 + 2 / 7) / 2)
    assert (a["decision_tp"], a["decision_fp"], a["decision_tn"], a["decision_fn"]) == (3, 1, 7, 1)
    assert a["flagged_count"] == 5 and a["undecided_count"] == 0
    assert a["calibration_size"] == 20  # the smaller seed's
    assert a["decision_threshold_mean"] == pytest.approx(1.1)
    assert a["decision_threshold_std"] == pytest.approx(0.1)
    assert a["false_alarm_rate"] == ALPHA and a["decision_note"] is None


def test_a_category_without_decisions_says_why(decisions) -> None:
    b = _row(decisions, "category", "b")
    assert b["undecided_count"] == 12 and b["flagged_count"] == 0
    assert math.isnan(b["realized_false_alarm_rate_mean"]) and math.isnan(b["recall_at_decision_mean"])
    assert "3 calibration image(s)" in b["decision_note"] and "16 more" in b["decision_note"]


def test_dataset_levels_skip_undecided_categories_and_sum_counts(decisions) -> None:
    for level, category in (("dataset_mean", "*mean*"), ("dataset_pooled", "*pooled*")):
        row = _row(decisions, level, category)
        assert row["realized_false_alarm_rate_mean"] == pytest.approx(0.125), level
        assert row["recall_at_decision_mean"] == pytest.approx(0.75), level
        assert row["undecided_count"] == 12 and row["decision_tp"] == 3
        assert row["calibration_size"] == 3
        assert "1 of 2 categories (b)" in row["decision_note"]
        assert math.isnan(row["decision_threshold_mean"])


def test_pooled_differs_from_the_mean_over_categories() -> None:
    frame = _rows()
    # Give b decisions: its 3 normal queries of seed 0 all flagged, none in seed 1.
    b = frame["category"] == "b"
    frame.loc[b, "calibration_size"] = 40
    frame.loc[b, "is_anomalous"] = (frame.loc[b, "seed"] == 0) & (frame.loc[b, "label"] == 0)
    out = summarize_decisions(frame)
    mean = _row(out, "dataset_mean", "*mean*")["realized_false_alarm_rate_mean"]
    pooled = _row(out, "dataset_pooled", "*pooled*")["realized_false_alarm_rate_mean"]
    # seed 0: a 1/4, b 3/3 → mean 0.625, pooled 4/7; seed 1: 0 and 0.
    assert mean == pytest.approx(0.625 / 2) and pooled == pytest.approx(4 / 7 / 2)


def test_the_summary_gains_the_columns_and_short_groups_are_listed(decisions) -> None:
    frame = _rows()
    summary = add_decision_metrics(summarize_scores(frame), decisions)
    assert list(summary.columns[-len(DECISION_COLUMNS):]) == list(DECISION_COLUMNS)
    assert str(summary["calibration_size"].dtype) == "Int64"
    assert short_calibration(summary) == [("line", "b", 3, 19)]
    md = summary_to_markdown(summary)
    assert "calibration n" in md and "false alarms (α = 0.05)" in md
    assert "- line / b (patchcore): 3 calibration image(s)" in md


def test_rows_without_decision_columns_summarise_as_undecided() -> None:
    frame = _rows().drop(columns=["is_anomalous", "calibration_size", "decision_threshold",
                                  "false_alarm_rate"])
    out = summarize_decisions(frame)
    a = _row(out, "category", "a")
    assert a["undecided_count"] == 14 and "written without them" in a["decision_note"]
    assert short_calibration(add_decision_metrics(summarize_scores(frame), out)) == []


def test_empty_input_gives_an_empty_frame_and_nan_columns() -> None:
    empty = summarize_decisions(_rows().iloc[:0])
    assert empty.empty and list(empty.columns)[-len(DECISION_COLUMNS):] == list(DECISION_COLUMNS)
    summary = summarize_scores(_rows())
    joined = add_decision_metrics(summary, empty)
    assert joined["realized_false_alarm_rate_mean"].isna().all()
    assert joined["decision_note"].isna().all()
