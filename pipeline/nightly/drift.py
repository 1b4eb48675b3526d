"""Score drift between two nights: per dataset, the score quantiles and the count of scores at
or above a fixed threshold, tonight against the previous night, with a status per dataset.

Pure pandas/numpy except :func:`write_drift`, which writes ``drift.{parquet,json,md}``.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.reports import write_report

LOG = logging.getLogger(__name__)

OK, NEW, GONE, DRIFT = "ok", "new", "gone", "drift"

_DRIFT_STATS: tuple[str, ...] = ("p50", "p90", "p99", "count", "above_count", "above_fraction")


def _night_stats(scores: pd.DataFrame | None, threshold: float, score_column: str) -> pd.DataFrame:
    """Per-dataset score quantiles and the count / fraction of rows scoring >= ``threshold``."""
    columns = ["dataset", *_DRIFT_STATS]
    if scores is None or scores.empty:
        return pd.DataFrame(columns=columns)
    missing = [c for c in ("dataset", score_column) if c not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks columns: {missing}")
    values = scores[score_column].astype(float)
    scored = values.notna()
    frame = pd.DataFrame({"dataset": scores["dataset"], "score": values,
                          "above": scored & (values >= threshold)})
    grouped = frame[scored].groupby("dataset", sort=True, dropna=False)
    out = pd.DataFrame(
        {
            "p50": grouped["score"].quantile(0.50),
            "p90": grouped["score"].quantile(0.90),
            "p99": grouped["score"].quantile(0.99),
            "count": grouped.size(),
            "above_count": grouped["above"].sum(),
        }
    )
    out["above_fraction"] = out["above_count"] / out["count"]
    return out.reset_index()[columns]


def drift_report(
    today: pd.DataFrame,
    previous: pd.DataFrame | None,
    *,
    threshold: float,
    score_column: str = "final_score",
) -> pd.DataFrame:
    """Compare tonight's score distribution per dataset with the previous night's.

    For each night: p50 / p90 / p99 of ``score_column``, ``count`` of scored
    rows (one per (query, seed)) and the count and fraction of them with
    ``score >= threshold``. ``diff_*`` columns are today minus previous. A
    dataset present on only one night (or ``previous=None``) keeps NaN on the
    other side and in the differences, so vanishing datasets stay visible.
    """
    now = _night_stats(today, threshold, score_column).add_prefix("today_")
    before = _night_stats(previous, threshold, score_column).add_prefix("previous_")
    report = now.merge(
        before, left_on="today_dataset", right_on="previous_dataset", how="outer", sort=True
    )
    report.insert(0, "dataset", report["today_dataset"].fillna(report["previous_dataset"]))
    report = report.drop(columns=["today_dataset", "previous_dataset"])
    for night in ("today", "previous"):
        for stat in ("count", "above_count"):
            report[f"{night}_{stat}"] = report[f"{night}_{stat}"].astype("Int64")
        for stat in ("p50", "p90", "p99", "above_fraction"):
            report[f"{night}_{stat}"] = report[f"{night}_{stat}"].astype(float)
    for stat in _DRIFT_STATS:
        report[f"diff_{stat}"] = report[f"today_{stat}"] - report[f"previous_{stat}"]
    report.insert(1, "threshold", float(threshold))
    report = report.sort_values("dataset", kind="stable").reset_index(drop=True)
    ordered = ["dataset", "threshold"] + [f"{n}_{s}" for n in ("today", "previous", "diff")
                                          for s in _DRIFT_STATS]
    return report[ordered]


def drift_status(report: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """``report`` (:func:`drift_report`) with a ``status`` per dataset.

    ``drift`` when p50, p90 or p99 moved by more than ``tolerance``, or the fraction of
    scores at or above the threshold did; ``new`` / ``gone`` when the dataset has scores on
    only one of the two nights; ``ok`` otherwise.
    """
    out = report.copy()
    moved = np.zeros(len(out), dtype=bool)
    for stat in ("p50", "p90", "p99", "above_fraction"):
        moved |= (out[f"diff_{stat}"].abs() > tolerance).fillna(False).to_numpy()
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

    threshold = report["threshold"].iloc[0] if len(report) else float("nan")
    lines = [f"# Score drift {date} vs {previous or 'no previous night'}", "",
             f"Threshold {fmt(threshold)}: scores at or above it count as above.", "",
             "| dataset | status | count | p50 | p90 | p99 | above | above % | "
             "prev p50 | prev p90 | prev p99 | prev above | prev above % |",
             "|" + "---|" * 13]
    for r in report.itertuples(index=False):
        pct = [None if pd.isna(x) else 100 * x for x in (r.today_above_fraction,
                                                       r.previous_above_fraction)]
        cells = [r.dataset, r.status, r.today_count, r.today_p50, r.today_p90, r.today_p99,
                 r.today_above_count, pct[0], r.previous_p50, r.previous_p90, r.previous_p99,
                 r.previous_above_count, pct[1]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_drift(report: pd.DataFrame, out_dir: str, *, date: str, previous: str | None,
                extra: dict) -> dict[str, str]:
    """``drift.parquet``, ``drift.json`` (``{"extra": ..., "records": ...}``) and ``drift.md``
    in ``out_dir``; returns their paths keyed ``parquet`` / ``json`` / ``markdown``."""
    return write_report(report, out_dir, "drift", drift_markdown(report, date, previous), extra)
