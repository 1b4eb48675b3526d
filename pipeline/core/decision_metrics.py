"""The summary of the calibrated decisions: how often the promise held where labels exist.

Score rows carry each query's decision at the run's stated false-alarm rate alpha
(``is_anomalous``, :mod:`pipeline.core.calibration`). Per (dataset, scorer, category, k)
this module counts the decisions against the labels and reports, beside the summary's
AUROC:

* ``realized_false_alarm_rate``: flagged normal queries / decided normal queries;
* ``recall_at_decision``: flagged anomalous queries / decided anomalous queries;
* ``anomaly_rate``: flagged / decided queries, labelled or not (what a production night
  without labels shows);

each per seed, then mean and population std over seeds, at the summary's three levels
(``category``; ``dataset_mean``: per seed the mean over categories; ``dataset_pooled``:
per seed the dataset's queries pooled). The confusion counts (``decision_tp``, ``_fp``,
``_tn``, ``_fn``), ``flagged_count`` and ``undecided_count`` are summed over seeds (so a
rate of the counts is the mean over seeds of the per-seed rates: every seed scores the same
queries). ``calibration_size`` is the smallest calibration set of the rows (over seeds, and
over categories at the dataset levels); ``decision_note`` says why rows have no decision.

Pure pandas; :func:`add_decision_metrics` joins the result onto a summary.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from pipeline.core.calibration import decision_note, min_calibration_size

#: Rates at the decision, each reported as ``<name>_mean`` and ``<name>_std`` over seeds.
DECISION_RATES: tuple[str, ...] = ("realized_false_alarm_rate", "recall_at_decision",
                                   "anomaly_rate")
#: Thresholds per category (mean and std over seeds; NaN at the dataset levels).
THRESHOLDS: tuple[str, ...] = ("decision_threshold", "pixel_decision_threshold")
#: Counts summed over seeds.
DECISION_COUNTS: tuple[str, ...] = ("decision_tp", "decision_fp", "decision_tn", "decision_fn",
                                    "flagged_count", "undecided_count")
#: What :func:`add_decision_metrics` appends to a summary, in order.
DECISION_COLUMNS: tuple[str, ...] = (
    "false_alarm_rate", "calibration_size",
    *(f"{m}_{stat}" for m in DECISION_RATES for stat in ("mean", "std")),
    *(f"{t}_{stat}" for t in THRESHOLDS for stat in ("mean", "std")),
    *DECISION_COUNTS, "decision_note")
#: Score-row columns the decisions are summarised from.
DECISION_INPUTS: tuple[str, ...] = ("is_anomalous", "calibration_size", "decision_threshold",
                                    "pixel_decision_threshold", "false_alarm_rate")

_KEYS = ["level", "dataset", "scorer", "category", "k"]
_CAT = ["dataset", "scorer", "category", "k"]
_DS = ["dataset", "scorer", "k"]
MEAN_CATEGORY, POOLED_CATEGORY = "*mean*", "*pooled*"


def _decision_frame(scores: pd.DataFrame) -> pd.DataFrame:
    """Per row: decided, flagged and the confusion cells as 0/1 integers."""
    flag = scores["is_anomalous"].astype("boolean")
    label = pd.to_numeric(scores["label"], errors="coerce").to_numpy(dtype=float,
                                                                    na_value=np.nan)
    decided = flag.notna().to_numpy(dtype=bool)
    flagged = flag.fillna(False).to_numpy(dtype=bool)
    normal, anomalous = label == 0, label == 1
    out = scores[[*_CAT, "seed"]].copy()
    out["decided"] = decided.astype(int)
    out["flagged_count"] = (decided & flagged).astype(int)
    out["undecided_count"] = (~decided).astype(int)
    out["decision_tp"] = (decided & flagged & anomalous).astype(int)
    out["decision_fn"] = (decided & ~flagged & anomalous).astype(int)
    out["decision_fp"] = (decided & flagged & normal).astype(int)
    out["decision_tn"] = (decided & ~flagged & normal).astype(int)
    for column in ("calibration_size", "false_alarm_rate", *THRESHOLDS):
        values = scores[column] if column in scores.columns else np.nan
        out[column] = pd.to_numeric(pd.Series(values, index=scores.index), errors="coerce")
    return out


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    return (num / den.where(den > 0)).astype(float)


def _rates(counts: pd.DataFrame) -> pd.DataFrame:
    """The rates of per-seed counts (NaN where a denominator is 0)."""
    return counts.assign(
        realized_false_alarm_rate=_ratio(counts["decision_fp"],
                                         counts["decision_fp"] + counts["decision_tn"]),
        recall_at_decision=_ratio(counts["decision_tp"],
                                  counts["decision_tp"] + counts["decision_fn"]),
        anomaly_rate=_ratio(counts["flagged_count"], counts["decided"]))


def _over_seeds(per_seed: pd.DataFrame, keys: list[str], metrics: Iterable[str]) -> pd.DataFrame:
    metrics = list(metrics)
    grouped = per_seed.groupby(keys, sort=True, dropna=False)[metrics]
    return pd.concat([grouped.mean().add_suffix("_mean"),
                      grouped.std(ddof=0).add_suffix("_std")], axis=1).reset_index()


_SUMMED = ["decided", *DECISION_COUNTS]


def _category_note(n: float, alpha: float) -> str | None:
    if math.isnan(alpha):
        return "no decisions: the rows were written without them"
    return decision_note(0 if math.isnan(n) else int(n), alpha)


def summarize_decisions(scores: pd.DataFrame) -> pd.DataFrame:
    """The decision columns (:data:`DECISION_COLUMNS`) per (level, dataset, scorer,
    category, k) of a score table with ``dataset, scorer, category, k, seed, label`` and
    :data:`DECISION_INPUTS` (missing ones read as null: no decision). Levels as
    :func:`pipeline.core.metrics.summarize_scores`'s; empty input, empty frame."""
    columns = [*_KEYS, *DECISION_COLUMNS]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    frame = scores.copy()
    if "is_anomalous" not in frame.columns:
        frame["is_anomalous"] = pd.NA
    if "scorer" not in frame.columns:
        frame["scorer"] = "inctrl"
    rows = _decision_frame(frame)

    cat_seed = rows.groupby([*_CAT, "seed"], sort=True, dropna=False).agg(
        **{c: (c, "sum") for c in _SUMMED},
        calibration_size=("calibration_size", "min"),
        **{t: (t, "first") for t in THRESHOLDS}).reset_index()
    cat_seed = _rates(cat_seed)
    # first() skips nulls: the stated rate of the group's rows.
    alpha = rows.groupby(_CAT, sort=True, dropna=False)["false_alarm_rate"].first()

    category = _over_seeds(cat_seed, _CAT, (*DECISION_RATES, *THRESHOLDS))
    grouped = cat_seed.groupby(_CAT, sort=True, dropna=False)
    category = category.merge(grouped[list(DECISION_COUNTS)].sum().reset_index(), on=_CAT)
    category = category.merge(grouped["calibration_size"].min().reset_index(), on=_CAT)
    category = category.merge(alpha.reset_index(), on=_CAT)
    category["decision_note"] = [
        _category_note(n, a) for n, a in zip(category["calibration_size"],
                                             category["false_alarm_rate"])]
    category.insert(0, "level", "category")

    ds_counts = category.groupby(_DS, sort=True, dropna=False).agg(
        **{c: (c, "sum") for c in DECISION_COUNTS},
        calibration_size=("calibration_size", "min"),
        false_alarm_rate=("false_alarm_rate", "first")).reset_index()
    notes = pd.DataFrame(
        [dict(zip(_DS, key), decision_note=_dataset_note(group))
         for key, group in category.groupby(_DS, sort=True, dropna=False)],
        columns=[*_DS, "decision_note"])

    seed_mean = cat_seed.groupby([*_DS, "seed"], sort=True, dropna=False)[
        list(DECISION_RATES)].mean().reset_index()
    dataset_mean = _over_seeds(seed_mean, _DS, DECISION_RATES).merge(ds_counts, on=_DS)
    dataset_mean = dataset_mean.merge(notes, on=_DS)
    dataset_mean.insert(0, "level", "dataset_mean")
    dataset_mean["category"] = MEAN_CATEGORY

    pooled_seed = _rates(cat_seed.groupby([*_DS, "seed"], sort=True, dropna=False)[
        _SUMMED].sum().reset_index())
    pooled = _over_seeds(pooled_seed, _DS, DECISION_RATES).merge(ds_counts, on=_DS)
    pooled = pooled.merge(notes, on=_DS)
    pooled.insert(0, "level", "dataset_pooled")
    pooled["category"] = POOLED_CATEGORY

    out = pd.concat([category, dataset_mean, pooled], ignore_index=True)
    for t in THRESHOLDS:
        for stat in ("mean", "std"):
            if f"{t}_{stat}" not in out.columns:
                out[f"{t}_{stat}"] = np.nan
    out["decision_note"] = out["decision_note"].astype(object).where(
        out["decision_note"].notna(), None)
    return out[columns]


def _dataset_note(categories: pd.DataFrame) -> str | None:
    without = categories[categories["decision_note"].notna()]
    if without.empty:
        return None
    names = ", ".join(str(c) for c in without["category"])
    return (f"no decisions in {len(without)} of {len(categories)} categories ({names}): "
            "see their rows")


def add_decision_metrics(summary: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with :data:`DECISION_COLUMNS` joined from :func:`summarize_decisions`
    (a left join on level, dataset, scorer, category, k; rows without get nulls)."""
    base = summary.drop(columns=[c for c in DECISION_COLUMNS if c in summary.columns])
    if decisions.empty or base.empty:
        out = base.assign(**{c: np.nan for c in DECISION_COLUMNS})
        out["decision_note"] = None
    else:
        right = decisions[[*_KEYS, *DECISION_COLUMNS]].astype(
            {c: base[c].dtype for c in _KEYS if c in base.columns})
        out = base.merge(right, on=_KEYS, how="left", validate="many_to_one")
        out.index = base.index
    ints = {c: "Int64" for c in ("calibration_size", *DECISION_COUNTS)}
    floats = {c: "float64" for c in DECISION_COLUMNS
              if c not in ints and c != "decision_note"}
    out = out.astype({**floats, **ints})
    out["decision_note"] = out["decision_note"].astype(object).where(
        out["decision_note"].notna(), None)
    return out


def short_calibration(summary: pd.DataFrame) -> list[tuple[str, str, int, int]]:
    """(dataset, category, calibration size, images needed) of every category whose rows
    have no decision because its calibration set is too small, once per category (the
    smallest size over its scorers)."""
    if summary.empty or "decision_note" not in summary.columns:
        return []
    rows = summary[(summary["level"] == "category") & summary["decision_note"].notna()
                   & summary["false_alarm_rate"].notna()]
    found: dict[tuple[str, str], tuple[int, int]] = {}
    for r in rows.to_dict("records"):
        n = 0 if pd.isna(r["calibration_size"]) else int(r["calibration_size"])
        need = min_calibration_size(float(r["false_alarm_rate"]))
        key = (str(r["dataset"]), str(r["category"]))
        if key not in found or n < found[key][0]:
            found[key] = (n, need)
    return [(d, c, n, need) for (d, c), (n, need) in sorted(found.items())]
