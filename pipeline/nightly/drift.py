"""Drift between two nights: per dataset (product line), the share of queries the calibrated
decisions flagged (``is_anomalous``), with the score quantiles beside it, tonight against
the previous night, and a status per dataset.

Decisions are calibrated per group on normal images at the run's stated false-alarm rate
(:mod:`pipeline.core.calibration`), so a line's anomaly rate means the same for every
scorer and every line: about the false-alarm rate on a normal night, more when parts are
defective. Raw scores have no common scale; the deprecated fixed ``threshold``
(``--alert-threshold``) still adds the count of scores at or above it where given.

Pure pandas/numpy except :func:`write_drift`, which writes ``drift.{parquet,json,md}``.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.reports import write_report

LOG = logging.getLogger(__name__)

OK, NEW, GONE, DRIFT = "ok", "new", "gone", "drift"

_DRIFT_STATS: tuple[str, ...] = ("p50", "p90", "p99", "count", "decided_count", "flagged_count",
                                 "anomaly_rate", "above_count", "above_fraction")
_COUNTS = ("count", "decided_count", "flagged_count", "above_count")
_RATES = ("p50", "p90", "p99", "anomaly_rate", "above_fraction")


def _night_stats(scores: pd.DataFrame | None, threshold: float | None,
                 score_column: str) -> pd.DataFrame:
    """Per dataset: score quantiles, rows scored, rows decided and flagged anomalous (and
    their share), and with a ``threshold`` the rows scoring >= it (else NaN)."""
    columns = ["dataset", *_DRIFT_STATS]
    if scores is None or scores.empty:
        return pd.DataFrame(columns=columns)
    missing = [c for c in ("dataset", score_column) if c not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks columns: {missing}")
    values = scores[score_column].astype(float)
    scored = values.notna()
    decision = (scores["is_anomalous"].astype("boolean") if "is_anomalous" in scores.columns
                else pd.Series(pd.NA, index=scores.index, dtype="boolean"))
    frame = pd.DataFrame({
        "dataset": scores["dataset"], "score": values,
        "decided": decision.notna().to_numpy(dtype=bool),
        "flagged": decision.fillna(False).to_numpy(dtype=bool),
        "above": (scored & (values >= threshold)) if threshold is not None else False})
    grouped = frame[scored].groupby("dataset", sort=True, dropna=False)
    out = pd.DataFrame(
        {
            "p50": grouped["score"].quantile(0.50),
            "p90": grouped["score"].quantile(0.90),
            "p99": grouped["score"].quantile(0.99),
            "count": grouped.size(),
            "decided_count": grouped["decided"].sum(),
            "flagged_count": grouped["flagged"].sum(),
            "above_count": grouped["above"].sum() if threshold is not None else np.nan,
        }
    )
    out["anomaly_rate"] = out["flagged_count"] / out["decided_count"].where(
        out["decided_count"] > 0)
    out["above_fraction"] = out["above_count"] / out["count"]
    return out.reset_index()[columns]


def drift_report(
    today: pd.DataFrame,
    previous: pd.DataFrame | None,
    *,
    threshold: float | None = None,
    score_column: str = "final_score",
) -> pd.DataFrame:
    """Compare tonight's decisions and scores per dataset with the previous night's.

    For each night: ``count`` of scored rows (one per (query, seed)), ``decided_count``
    and ``flagged_count`` of rows with a decision and of those flagged anomalous
    (``is_anomalous``; rows without the column count as undecided), ``anomaly_rate`` =
    flagged / decided (NaN without decisions), p50 / p90 / p99 of ``score_column``, and,
    with a ``threshold`` (deprecated), the count and fraction of rows with ``score >=
    threshold`` (NaN without one). ``diff_*`` columns are today minus previous. A dataset
    present on only one night (or ``previous=None``) keeps NaN on the other side and in
    the differences, so vanishing datasets stay visible.
    """
    now = _night_stats(today, threshold, score_column).add_prefix("today_")
    before = _night_stats(previous, threshold, score_column).add_prefix("previous_")
    report = now.merge(
        before, left_on="today_dataset", right_on="previous_dataset", how="outer", sort=True
    )
    report.insert(0, "dataset", report["today_dataset"].fillna(report["previous_dataset"]))
    report = report.drop(columns=["today_dataset", "previous_dataset"])
    for night in ("today", "previous"):
        for stat in _COUNTS:
            report[f"{night}_{stat}"] = report[f"{night}_{stat}"].astype(float).astype("Int64")
        for stat in _RATES:
            report[f"{night}_{stat}"] = report[f"{night}_{stat}"].astype(float)
    for stat in _DRIFT_STATS:
        report[f"diff_{stat}"] = report[f"today_{stat}"] - report[f"previous_{stat}"]
    report.insert(1, "threshold", math.nan if threshold is None else float(threshold))
    report = report.sort_values("dataset", kind="stable").reset_index(drop=True)
    ordered = ["dataset", "threshold"] + [f"{n}_{s}" for n in ("today", "previous", "diff")
                                          for s in _DRIFT_STATS]
    return report[ordered]


def drift_status(report: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """``report`` (:func:`drift_report`) with a ``status`` per dataset.

    ``drift`` when the anomaly rate moved by more than ``tolerance``, or p50, p90 or p99
    did, or (with the deprecated threshold) the fraction of scores at or above it did;
    ``new`` / ``gone`` when the dataset has scores on only one of the two nights; ``ok``
    otherwise.
    """
    out = report.copy()
    moved = np.zeros(len(out), dtype=bool)
    for stat in ("anomaly_rate", "p50", "p90", "p99", "above_fraction"):
        moved |= (out[f"diff_{stat}"].abs() > tolerance).fillna(False).to_numpy(dtype=bool)
    today = out["today_count"].fillna(0).astype(int).to_numpy() > 0
    before = out["previous_count"].fillna(0).astype(int).to_numpy() > 0
    out["status"] = np.select([today & ~before, ~today & before, moved], [NEW, GONE, DRIFT], OK)
    return out


def drift_markdown(report: pd.DataFrame, date: str, previous: str | None) -> str:
    """A human table of a :func:`drift_status` report."""
    def fmt(v: Any) -> str:
        if v is None or pd.isna(v):
            return "n/a"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    def pct(v: Any) -> Any:
        return None if v is None or pd.isna(v) else 100 * float(v)

    threshold = report["threshold"].iloc[0] if len(report) else float("nan")
    with_threshold = not pd.isna(threshold)
    head = ["dataset", "status", "count", "flagged", "anomaly %", "p50", "p90", "p99",
            "prev flagged", "prev anomaly %", "prev p50", "prev p90", "prev p99"]
    if with_threshold:
        head += ["above", "above %", "prev above", "prev above %"]
    lines = [f"# Drift {date} vs {previous or 'no previous night'}", "",
             "flagged: rows the calibrated decisions flagged anomalous; anomaly %: of the "
             "rows with a decision.", ""]
    if with_threshold:
        lines += [f"Threshold {fmt(threshold)} (deprecated): scores at or above it count as "
                  "above.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.itertuples(index=False):
        cells = [r.dataset, r.status, r.today_count, r.today_flagged_count,
                 pct(r.today_anomaly_rate), r.today_p50, r.today_p90, r.today_p99,
                 r.previous_flagged_count, pct(r.previous_anomaly_rate), r.previous_p50,
                 r.previous_p90, r.previous_p99]
        if with_threshold:
            cells += [r.today_above_count, pct(r.today_above_fraction), r.previous_above_count,
                      pct(r.previous_above_fraction)]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_drift(report: pd.DataFrame, out_dir: str, *, date: str, previous: str | None,
                extra: dict) -> dict[str, str]:
    """``drift.parquet``, ``drift.json`` (``{"extra": ..., "records": ...}``) and ``drift.md``
    in ``out_dir``; returns their paths keyed ``parquet`` / ``json`` / ``markdown``."""
    return write_report(report, out_dir, "drift", drift_markdown(report, date, previous), extra)
