"""Score drift between two nights: the per-dataset statistics, the status, the files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.nightly.drift import (DRIFT, GONE, NEW, OK, drift_markdown, drift_report,
                                    drift_status, write_drift)


def _night(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"dataset": d, "final_score": v} for d, vs in values.items() for v in vs]
    )


def test_drift_report_differences() -> None:
    today = _night({"a": [0.1, 0.5, 0.9, 0.95], "new": [0.2]})
    previous = _night({"a": [0.1, 0.2, 0.3, 0.8, 0.85], "gone": [0.9]})
    report = drift_report(today, previous, threshold=0.8).set_index("dataset")

    assert list(report.index) == ["a", "gone", "new"]
    a = report.loc["a"]
    assert (a["today_count"], a["today_above_count"], a["previous_count"],
            a["previous_above_count"]) == (4, 2, 5, 2)
    assert a["today_above_fraction"] == pytest.approx(0.5)
    assert a["previous_above_fraction"] == pytest.approx(0.4)
    assert a["diff_above_fraction"] == pytest.approx(0.1)
    assert a["diff_count"] == -1
    assert a["today_p50"] == pytest.approx(np.quantile([0.1, 0.5, 0.9, 0.95], 0.5))
    assert a["diff_p90"] == pytest.approx(
        np.quantile([0.1, 0.5, 0.9, 0.95], 0.9) - np.quantile([0.1, 0.2, 0.3, 0.8, 0.85], 0.9)
    )
    assert pd.isna(report.loc["new", "previous_p50"]) and pd.isna(report.loc["new", "diff_p50"])
    assert pd.isna(report.loc["gone", "today_count"]) and report.loc["gone", "previous_count"] == 1
    assert (report["threshold"] == 0.8).all()


def test_drift_report_without_previous_night() -> None:
    today = _night({"a": [0.1, 0.9, np.nan]})
    report = drift_report(today, None, threshold=0.5)
    assert list(report["dataset"]) == ["a"]
    row = report.iloc[0]
    assert row["today_count"] == 2  # the NaN score is not counted
    assert row["today_above_fraction"] == pytest.approx(0.5)
    previous_cols = [c for c in report.columns if c.startswith(("previous_", "diff_"))]
    assert report[previous_cols].isna().all().all()


def test_drift_status_per_dataset():
    today = pd.DataFrame({"dataset": ["same"] * 4 + ["moved"] * 4 + ["new"] * 2,
                          "final_score": [.1, .2, .3, .4, .8, .9, .9, .95, .1, .2]})
    before = pd.DataFrame({"dataset": ["same"] * 4 + ["moved"] * 4 + ["gone"] * 2,
                           "final_score": [.1, .2, .3, .41, .1, .2, .3, .4, .5, .6]})
    report = drift_status(drift_report(today, before, threshold=0.5), tolerance=0.1)
    status = dict(zip(report["dataset"], report["status"]))
    assert status == {"same": OK, "moved": DRIFT, "new": NEW, "gone": GONE}
    moved = report.set_index("dataset").loc["moved"]
    assert (moved["today_above_count"], moved["previous_above_count"]) == (4, 0)
    text = drift_markdown(report, "2024-01-03", "2024-01-02")
    assert "2024-01-03 vs 2024-01-02" in text
    assert all(f"| {d} | {s} |" in text for d, s in status.items())


def test_only_the_above_fraction_moving_is_drift():
    # Same quantiles up to 0.05, but the threshold sits between them: the fraction jumps.
    today = _night({"a": [0.1, 0.52, 0.53, 0.54]})
    before = _night({"a": [0.1, 0.47, 0.48, 0.49]})
    report = drift_status(drift_report(today, before, threshold=0.5), tolerance=0.1)
    assert report["status"].tolist() == [DRIFT]
    calm = drift_status(drift_report(today, before, threshold=0.9), tolerance=0.1)
    assert calm["status"].tolist() == [OK]


def test_first_night_has_only_new_datasets():
    today = pd.DataFrame({"dataset": ["a"], "final_score": [0.2]})
    report = drift_status(drift_report(today, None, threshold=0.5), tolerance=0.1)
    assert report["status"].tolist() == [NEW]
    assert "no previous night" in drift_markdown(report, "2024-01-02", None)


def test_write_drift_writes_the_three_files(tmp_path):
    report = drift_status(drift_report(_night({"a": [0.2, 0.9]}), None, threshold=0.5), 0.1)
    paths = write_drift(report, str(tmp_path / "summary"), date="2024-01-02", previous=None,
                        extra={"run_date": "2024-01-02", "previous_date": None})
    assert {k: v.rpartition("/")[2] for k, v in paths.items()} == {
        "parquet": "drift.parquet", "json": "drift.json", "markdown": "drift.md"}
    pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), report)
    with open(paths["json"]) as f:
        doc = json.load(f)
    assert doc["extra"] == {"run_date": "2024-01-02", "previous_date": None}
    (record,) = doc["records"]
    assert record["status"] == NEW and record["today_count"] == 2
    assert record["previous_p50"] is None and record["previous_count"] is None
    with open(paths["markdown"]) as f:
        assert f.read() == drift_markdown(report, "2024-01-02", None)


def _decided(values: dict[str, list]) -> pd.DataFrame:
    """Rows of (score, is_anomalous) per dataset; None is a row without a decision."""
    return pd.DataFrame([{"dataset": d, "final_score": s, "is_anomalous": f}
                         for d, rows in values.items() for s, f in rows])


def test_alerts_count_decisions_per_line_not_scores_above_one_number() -> None:
    # Line "a" flags 2 of 4 decided rows (a fifth has no decision), line "b" none: raw
    # scores of "b" are far higher, on a scale of their own.
    today = _decided({"a": [(0.1, True), (0.2, True), (0.3, False), (0.4, False), (0.5, None)],
                      "b": [(50.0, False), (60.0, False)]})
    report = drift_report(today, None).set_index("dataset")
    a, b = report.loc["a"], report.loc["b"]
    assert (a["today_count"], a["today_decided_count"], a["today_flagged_count"]) == (5, 4, 2)
    assert a["today_anomaly_rate"] == pytest.approx(0.5)
    assert (b["today_flagged_count"], b["today_anomaly_rate"]) == (0, 0.0)
    # Without the deprecated threshold there is no raw-score count.
    assert report["threshold"].isna().all() and report["today_above_count"].isna().all()
    assert "above" not in drift_markdown(drift_status(report.reset_index(), 0.1), "d", None)


def test_a_line_drifts_when_its_anomaly_rate_moves():
    # The same scores both nights; only the decisions changed (a recalibrated line, or parts
    # flagged that the calibration now calls abnormal).
    scores = [0.1, 0.2, 0.3, 0.4]
    before = _decided({"a": list(zip(scores, [False, False, False, False])),
                       "b": list(zip(scores, [True, False, False, False]))})
    today = _decided({"a": list(zip(scores, [True, True, False, False])),
                      "b": list(zip(scores, [False, True, False, False]))})
    report = drift_status(drift_report(today, before), tolerance=0.1).set_index("dataset")
    assert report.loc["a", "status"] == DRIFT and report.loc["b", "status"] == OK
    assert report.loc["a", "diff_anomaly_rate"] == pytest.approx(0.5)
    text = drift_markdown(report.reset_index(), "2024-01-03", "2024-01-02")
    assert "| a | drift | 4 | 2 | 50.000 |" in text


def test_rows_without_decisions_have_no_anomaly_rate():
    report = drift_report(_night({"a": [0.1, 0.9]}), None)
    row = report.iloc[0]
    assert row["today_decided_count"] == 0 and pd.isna(row["today_anomaly_rate"])
