"""Metric summaries of scored anomaly tables.

Score tables hold one row per (query image, seed, scorer). Everything here is
pure pandas/numpy compute except :func:`write_summary` and
:func:`write_comparison`, the I/O edges, which write through fsspec so local
paths and ``gs://`` both work.

Aggregation over seeds (documented once, used everywhere): a metric is first
computed per seed on that seed's labelled rows, then reported as the mean and
the *population* standard deviation (``ddof=0``) over seeds. A single seed
therefore has std 0.0, not NaN. Pixel metrics (pixel AUROC, AUPRO, pixel AUPR,
pixel F1-max; computed by :mod:`pipeline.core.pixel_metrics` per category and seed)
are aggregated the same way by :func:`summarize_pixel_metrics` and joined onto the
summary by :func:`add_pixel_metrics`; the calibrated decisions' rates
(:mod:`pipeline.core.decision_metrics`) by ``add_decision_metrics``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.core.decision_metrics import DECISION_RATES
from pipeline.core.reports import write_report
from pipeline.model.scorers.inctrl import INCTRL
from pipeline.model.scorers.registry import scorer_names

LOG = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("auroc", "auprc", "f1_max", "f1_threshold")
QUANTILE_COLUMNS: tuple[str, ...] = ("score_p50", "score_p90", "score_p99", "score_max", "score_mean")
COUNT_COLUMNS: tuple[str, ...] = ("query_count", "anomalous_count", "normal_count", "unlabeled_count")
LEVELS: tuple[str, ...] = ("category", "dataset_mean", "dataset_pooled")
#: The scorer of tables written before they had a ``scorer`` column.
DEFAULT_SCORER = INCTRL
#: The summary metrics the comparison reports, each as mean and std over seeds.
COMPARISON_METRICS: tuple[str, ...] = ("auroc", "auprc")
#: Pixel-level metrics, per (dataset, scorer, category, k, seed) from the anomaly maps.
PIXEL_METRICS: tuple[str, ...] = ("pixel_auroc", "aupro", "pixel_aupr", "pixel_f1_max")
#: The decisions' rates the comparison reports where labels exist (realized false-alarm
#: rate on normal queries, recall on anomalous ones, at the run's stated rate).
COMPARISON_DECISIONS: tuple[str, ...] = DECISION_RATES[:2]
#: What :func:`add_pixel_metrics` appends to a summary.
PIXEL_COLUMNS: tuple[str, ...] = (
    "pixel_images", *(f"{m}_{stat}" for m in PIXEL_METRICS for stat in ("mean", "std")))
#: Section titles of the Markdown comparison.
_TITLES = {"auroc": "AUROC", "auprc": "AUPRC", "pixel_auroc": "Pixel AUROC", "aupro": "AUPRO",
           "pixel_aupr": "Pixel AUPR", "pixel_f1_max": "Pixel F1-max",
           "realized_false_alarm_rate": "False-alarm rate at the decision",
           "recall_at_decision": "Recall at the decision"}
MEAN_CATEGORY = "*mean*"
POOLED_CATEGORY = "*pooled*"
#: What an empty summary says (the run had no query with a score).
NO_QUERIES = ("No queries were scored in this run: the manifest (or the date) had none, or "
              "all failed (see the errors table).")

_REQUIRED = ("dataset", "category", "k", "seed", "label")
_PIXEL_REQUIRED = ("dataset", "scorer", "category", "k", "seed", "pixel_auroc", "aupro",
                   "pixel_images")
_JOIN_KEYS = ["level", "dataset", "scorer", "category", "k"]
_SUMMARY_COLUMNS: tuple[str, ...] = (
    "level",
    "dataset",
    "scorer",
    "category",
    "k",
    "score_column",
    "n_seeds",
    *COUNT_COLUMNS,
    *(f"{m}_{stat}" for m in METRICS for stat in ("mean", "std")),
    *QUANTILE_COLUMNS,
)


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, AUPRC (average precision), best F1 and its threshold.

    ``labels`` are 0 (normal) / 1 (anomalous); higher scores mean more anomalous
    and an image is predicted anomalous when ``score >= f1_threshold``. Pairs
    with a missing label or a non-finite score are dropped (with a warning for
    scores) because sklearn cannot rank them. With fewer than two classes the
    metrics are undefined, so every value is NaN instead of raising.
    """
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    keep = ~np.isnan(y)
    bad_scores = keep & ~np.isfinite(s)
    if bad_scores.any():
        LOG.warning("Dropping %d labelled rows with non-finite scores", int(bad_scores.sum()))
    keep &= np.isfinite(s)
    y, s = y[keep], s[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y.tolist()))}")

    nan_result = {m: math.nan for m in METRICS}
    if np.unique(y).size < 2:
        return nan_result

    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return {
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
        "f1_max": float(f1[best]),
        "f1_threshold": float(thresholds[best]),
    }


def _per_seed(scores: pd.DataFrame, keys: list[str], score_column: str) -> pd.DataFrame:
    """One row per (*keys, seed): metrics on that seed's labelled rows plus row counts."""
    rows = []
    for key, group in scores.groupby([*keys, "seed"], sort=True, dropna=False):
        labels = group["label"]
        labelled = labels.notna()
        metrics = image_metrics(
            labels[labelled].to_numpy(dtype=float),
            group.loc[labelled, score_column].to_numpy(dtype=float),
        )
        rows.append(
            {
                **dict(zip([*keys, "seed"], key)),
                "query_count": len(group),
                "anomalous_count": int((labels == 1).sum()),
                "normal_count": int((labels == 0).sum()),
                "unlabeled_count": int((~labelled).sum()),
                **metrics,
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "seed", *COUNT_COLUMNS, *METRICS])


def _over_seeds(per_seed: pd.DataFrame, keys: list[str],
                metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Mean and population std (ddof=0) of each metric over seeds, per ``keys``."""
    grouped = per_seed.groupby(keys, sort=True, dropna=False)
    means = grouped[list(metrics)].mean().add_suffix("_mean")
    stds = grouped[list(metrics)].std(ddof=0).add_suffix("_std")
    n_seeds = grouped["seed"].nunique().rename("n_seeds")
    return pd.concat([n_seeds, means, stds], axis=1).reset_index()


def _score_quantiles(scores: pd.DataFrame, keys: list[str], score_column: str) -> pd.DataFrame:
    """Score distribution over all rows (all seeds, labelled or not) per ``keys``; NaN scores skipped."""
    values = scores[score_column].astype(float)
    grouped = values.groupby([scores[k] for k in keys], sort=True, dropna=False)
    out = pd.DataFrame(
        {
            "score_p50": grouped.quantile(0.50),
            "score_p90": grouped.quantile(0.90),
            "score_p99": grouped.quantile(0.99),
            "score_max": grouped.max(),
            "score_mean": grouped.mean(),
        }
    )
    return out.reset_index()


def _category_counts(per_seed: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Counts for one seed per category ``keys``; the max over seeds, warning when seeds disagree."""
    grouped = per_seed.groupby(keys, sort=True, dropna=False)[list(COUNT_COLUMNS)]
    counts_max, counts_min = grouped.max(), grouped.min()
    uneven = (counts_max != counts_min).any(axis=1)
    if uneven.any():
        LOG.warning(
            "Seeds score different query sets for %d group(s), e.g. %s; reporting the largest seed",
            int(uneven.sum()),
            uneven[uneven].index[0],
        )
    return counts_max.reset_index()


def ordered_scorers(names: Iterable[Any]) -> list[str]:
    """Distinct scorer names in report order: the registry's (the paper's method first, then
    the baselines), then any others alphabetically."""
    distinct = {str(n) for n in names}
    known = [s for s in scorer_names() if s in distinct]
    return known + sorted(distinct - set(known))


def _with_scorer(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``scorer`` column; absent or missing values become :data:`DEFAULT_SCORER`.

    Tables written before scorers multiplied were all scored by InCTRL, so they
    (and rows concatenated from them) keep summarizing as that one scorer.
    """
    if "scorer" not in frame.columns:
        return frame.assign(scorer=DEFAULT_SCORER)
    scorer = frame["scorer"].astype(object)
    return frame.assign(scorer=scorer.where(scorer.notna(), DEFAULT_SCORER))


def summarize_scores(scores: pd.DataFrame, score_column: str = "final_score") -> pd.DataFrame:
    """Summarize a score table into one long frame with a ``level`` column.

    Levels, each per scorer and ``k`` (requested shots):

    * ``category``: per (dataset, category). Counts are for one seed (rows are
      per (query, seed, scorer)); metrics are mean / population std over seeds.
    * ``dataset_mean`` (category ``*mean*``): per seed, the mean over the
      dataset's categories of the per-seed category metric (categories without
      both classes are skipped); then mean / std over seeds. The mean equals
      the mean of category means as the InCTRL paper reports it.
    * ``dataset_pooled`` (category ``*pooled*``): metrics on all of the dataset's
      queries pooled per seed, then mean / std over seeds.

    A table without a ``scorer`` column is one scorer, :data:`DEFAULT_SCORER`;
    the output always has ``scorer`` right after ``dataset``. Rows are sorted
    by dataset, level, scorer (in :func:`ordered_scorers` order), category, k.

    Dataset-level counts are sums of category counts. Only labelled rows enter
    metrics; groups without both classes get NaN metrics. ``score_p50`` ...
    ``score_mean`` describe ``score_column`` over all of a group's rows, so
    unlabelled datasets still get a summary.
    """
    missing = [c for c in (*_REQUIRED, score_column) if c not in scores.columns]
    if missing:
        raise ValueError(f"score table lacks columns: {missing}")
    if scores.empty:
        return pd.DataFrame(columns=list(_SUMMARY_COLUMNS))
    scores = _with_scorer(scores)

    cat_keys, ds_keys = ["dataset", "scorer", "category", "k"], ["dataset", "scorer", "k"]
    cat_seed = _per_seed(scores, cat_keys, score_column)
    cat_counts = _category_counts(cat_seed, cat_keys)

    category = _over_seeds(cat_seed, cat_keys).merge(cat_counts, on=cat_keys)
    category = category.merge(_score_quantiles(scores, cat_keys, score_column), on=cat_keys)
    category.insert(0, "level", "category")

    ds_counts = cat_counts.groupby(ds_keys, sort=True, dropna=False)[list(COUNT_COLUMNS)].sum().reset_index()
    ds_quantiles = _score_quantiles(scores, ds_keys, score_column)

    # pandas' mean skips NaN: a seed's category average ignores single-class categories.
    seed_cat_avg = cat_seed.groupby([*ds_keys, "seed"], sort=True, dropna=False)[list(METRICS)].mean().reset_index()
    dataset_mean = _over_seeds(seed_cat_avg, ds_keys).merge(ds_counts, on=ds_keys).merge(ds_quantiles, on=ds_keys)
    dataset_mean.insert(0, "level", "dataset_mean")
    dataset_mean["category"] = MEAN_CATEGORY

    pooled_seed = _per_seed(scores, ds_keys, score_column)
    pooled = _over_seeds(pooled_seed, ds_keys).merge(ds_counts, on=ds_keys).merge(ds_quantiles, on=ds_keys)
    pooled.insert(0, "level", "dataset_pooled")
    pooled["category"] = POOLED_CATEGORY

    summary = pd.concat([category, dataset_mean, pooled], ignore_index=True)
    summary["score_column"] = score_column
    scorer_rank = {name: i for i, name in enumerate(ordered_scorers(summary["scorer"]))}
    summary["_level_order"] = summary["level"].map({lvl: i for i, lvl in enumerate(LEVELS)})
    summary["_scorer_order"] = summary["scorer"].map(scorer_rank)
    summary = summary.sort_values(["dataset", "_level_order", "_scorer_order", "category", "k"], kind="stable")
    summary = summary.drop(columns=["_level_order", "_scorer_order"]).reset_index(drop=True)
    for col in ("n_seeds", *COUNT_COLUMNS):
        summary[col] = summary[col].astype("int64")
    return summary[list(_SUMMARY_COLUMNS)]


def summarize_pixel_metrics(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Aggregate per-seed pixel metrics into the summary's ``category`` and ``dataset_mean`` levels.

    ``per_seed`` has one row per (dataset, scorer, category, k, seed) with
    ``pixel_auroc``, ``aupro``, ``pixel_aupr``, ``pixel_f1_max`` (NaN where undefined,
    e.g. a category without masks; the last two NaN when absent) and ``pixel_images`` (how many maps entered that seed's statistics). Levels, as in
    :func:`summarize_scores`:

    * ``category``: mean / population std (ddof=0) over seeds; ``pixel_images`` is
      one seed's count (the largest).
    * ``dataset_mean`` (category ``*mean*``): per seed the mean over categories
      (NaN categories skipped), then mean / std over seeds; ``pixel_images`` is the
      sum over categories.

    There is no ``dataset_pooled`` level: pooling would rank pixels of different
    categories together and needs their merged statistics, not per-category numbers,
    so pooled summary rows get NaN pixel metrics from :func:`add_pixel_metrics`.

    Returns:
        Columns ``level, dataset, scorer, category, k`` and :data:`PIXEL_COLUMNS`.

    Raises:
        ValueError: a column is missing, or a (dataset, scorer, category, k, seed)
            appears twice.
    """
    missing = [c for c in _PIXEL_REQUIRED if c not in per_seed.columns]
    if missing:
        raise ValueError(f"pixel metric table lacks columns: {missing}")
    columns = [*_JOIN_KEYS, *PIXEL_COLUMNS]
    if per_seed.empty:
        return pd.DataFrame(columns=columns)
    cat_keys, ds_keys = ["dataset", "scorer", "category", "k"], ["dataset", "scorer", "k"]
    repeated = per_seed.duplicated([*cat_keys, "seed"])
    if repeated.any():
        first = per_seed.loc[repeated, [*cat_keys, "seed"]].iloc[0].tolist()
        raise ValueError(f"pixel metrics given twice for (dataset, scorer, category, k, seed) "
                         f"{tuple(first)}")
    # Rows of runs before pixel AUPR and F1-max existed lack them: NaN.
    per_seed = per_seed.assign(**{m: np.nan for m in PIXEL_METRICS if m not in per_seed.columns})
    per_seed = per_seed.astype({m: "float64" for m in PIXEL_METRICS})

    images = per_seed.groupby(cat_keys, sort=True, dropna=False)["pixel_images"]
    if (images.max() != images.min()).any():
        LOG.warning("Seeds have pixel statistics of different image sets; reporting the largest")
    category = _over_seeds(per_seed, cat_keys, PIXEL_METRICS).merge(
        images.max().reset_index(), on=cat_keys)
    category.insert(0, "level", "category")

    seed_cat_avg = per_seed.groupby([*ds_keys, "seed"], sort=True, dropna=False)[
        list(PIXEL_METRICS)].mean().reset_index()
    ds_images = category.groupby(ds_keys, sort=True, dropna=False)["pixel_images"].sum()
    dataset_mean = _over_seeds(seed_cat_avg, ds_keys, PIXEL_METRICS).merge(
        ds_images.reset_index(), on=ds_keys)
    dataset_mean.insert(0, "level", "dataset_mean")
    dataset_mean["category"] = MEAN_CATEGORY

    out = pd.concat([category, dataset_mean], ignore_index=True)
    out["pixel_images"] = out["pixel_images"].astype("int64")
    return out[columns]


def add_pixel_metrics(summary: pd.DataFrame, pixel_summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with :data:`PIXEL_COLUMNS` joined from a :func:`summarize_pixel_metrics` table.

    A left join on (level, dataset, scorer, category, k): the summary keeps its rows,
    order and columns, and rows without pixel metrics (no masks, the ``dataset_pooled``
    level) get NaN (``pixel_images`` is a nullable integer, NA there). Pixel columns the
    summary already has are replaced.

    Raises:
        ValueError: ``pixel_summary`` has a key twice.
    """
    base = summary.drop(columns=[c for c in PIXEL_COLUMNS if c in summary.columns])
    if pixel_summary.empty or base.empty:
        out = base.assign(**{c: np.nan for c in PIXEL_COLUMNS})
    else:
        # An empty or differently built table may type the keys differently (k as object).
        right = pixel_summary[[*_JOIN_KEYS, *PIXEL_COLUMNS]].astype(
            {c: base[c].dtype for c in _JOIN_KEYS})
        try:
            out = base.merge(right, on=_JOIN_KEYS, how="left", validate="many_to_one")
        except pd.errors.MergeError as exc:
            raise ValueError(f"pixel summary has a (level, dataset, scorer, category, k) "
                             f"twice: {exc}") from exc
        out.index = base.index
    return out.astype({"pixel_images": "Int64",
                       **{c: "float64" for c in PIXEL_COLUMNS if c != "pixel_images"}})


def _has_pixel_metrics(frame: pd.DataFrame, columns: Iterable[str]) -> bool:
    """Whether ``frame`` has every one of ``columns`` and a value in at least one."""
    columns = list(columns)
    return bool(columns) and all(c in frame.columns for c in columns) and bool(
        frame[columns].notna().to_numpy().any())


def _fmt(value: Any) -> str:
    """Three-decimal float, or ``n/a`` for missing values."""
    return "n/a" if value is None or pd.isna(value) else f"{float(value):.3f}"


def _fmt_mean_std(mean: Any, std: Any) -> str:
    """``0.912 ± 0.013``; just the mean when the std is missing; ``n/a`` when the mean is."""
    if mean is None or pd.isna(mean):
        return "n/a"
    if std is None or pd.isna(std):
        return _fmt(mean)
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _md_cell(value: Any) -> str:
    """Text safe to put in a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def summary_to_markdown(summary: pd.DataFrame) -> str:
    """Render a :func:`summarize_scores` table as a Markdown table for humans.

    Groups with no labelled rows show their score distribution
    (``p50=… p90=… max=…``) in the AUROC cell instead of metrics, since there
    is nothing to evaluate against. Pixel columns (from :func:`add_pixel_metrics`)
    appear only when some row has one; the decisions' columns (calibration size,
    false-alarm rate and recall at the decision, anomaly rate) when the summary has
    them, with the rows' notes (why a group has no decision) listed below. An empty
    table says so in words.
    """
    if summary.empty:
        return NO_QUERIES + "\n"
    pixel_metrics = tuple(m for m in PIXEL_METRICS if _has_pixel_metrics(summary, [f"{m}_mean"]))
    decisions = "calibration_size" in summary.columns and "anomaly_rate_mean" in summary.columns
    header = ["dataset", "scorer", "category", "k", "queries", "anomalous", "AUROC", "AUPRC", "F1-max",
              *(_TITLES[m] for m in pixel_metrics)]
    if decisions:
        alpha = summary["false_alarm_rate"].dropna()
        stated = f" (α = {float(alpha.iloc[0]):g})" if len(alpha) else ""
        header += ["calibration n", f"false alarms{stated}", "recall", "anomaly rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    notes = []
    for row in summary.itertuples(index=False):
        unlabelled = row.anomalous_count + row.normal_count == 0
        if unlabelled:
            scores = f"p50={_fmt(row.score_p50)} p90={_fmt(row.score_p90)} max={_fmt(row.score_max)}"
            metric_cells = [scores, "", ""]
            anomalous = "n/a"
        else:
            metric_cells = [
                _fmt_mean_std(getattr(row, f"{m}_mean"), getattr(row, f"{m}_std"))
                for m in ("auroc", "auprc", "f1_max")
            ]
            anomalous = str(row.anomalous_count)
        metric_cells += [_fmt_mean_std(getattr(row, f"{m}_mean"), getattr(row, f"{m}_std"))
                         for m in pixel_metrics]
        if decisions:
            n = row.calibration_size
            metric_cells += [("n/a" if pd.isna(n) else str(int(n))),
                             *(_fmt_mean_std(getattr(row, f"{m}_mean"), getattr(row, f"{m}_std"))
                               for m in DECISION_RATES)]
            note = getattr(row, "decision_note", None)
            if note and row.level == "category":
                notes.append(f"- {row.dataset} / {row.category} ({row.scorer}): {note}")
        scorer = getattr(row, "scorer", DEFAULT_SCORER)  # summaries written before the column
        cells = [row.dataset, scorer, row.category, row.k, row.query_count, anomalous, *metric_cells]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if notes:
        lines += ["", "Rows without a decision:", "", *notes]
    return "\n".join(lines) + "\n"


def write_summary(summary: pd.DataFrame, out_dir: str, *, extra: dict | None = None) -> dict[str, str]:
    """Write ``summary.parquet``, ``summary.json`` and ``summary.md`` into ``out_dir``.

    ``out_dir`` is any fsspec URL (local directories are created). The JSON is
    ``{"extra": {...}, "records": [...]}`` with NaN written as null, so run
    metadata (run id, model id) travels with the numbers. Returns
    ``{"parquet": path, "json": path, "markdown": path}``
    (:func:`pipeline.core.reports.write_report`).
    """
    paths = write_report(summary, out_dir, "summary", summary_to_markdown(summary), extra)
    LOG.info("Wrote summary of %d rows to %s", len(summary), out_dir.rstrip("/"))
    return paths


def _comparison_columns(scorer: str, metrics: tuple[str, ...] = COMPARISON_METRICS) -> list[str]:
    """The comparison's columns for one scorer: ``<scorer>_<metric>_<mean|std>``."""
    return [f"{scorer}_{m}_{stat}" for m in metrics for stat in ("mean", "std")]


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The paper's view of a :func:`summarize_scores` table: scorers side by side.

    One row per (dataset, k) from the ``dataset_mean`` level (per seed the mean
    over categories, then mean / population std over seeds, as the InCTRL paper
    reports). Columns are ``dataset``, ``k`` and, per scorer in
    :func:`ordered_scorers` order, ``<scorer>_auroc_mean``, ``<scorer>_auroc_std``,
    ``<scorer>_auprc_mean``, ``<scorer>_auprc_std``; then, for each pixel metric the
    summary has (:func:`add_pixel_metrics`: ``pixel_auroc``, ``aupro``, ``pixel_aupr``,
    ``pixel_f1_max``) and, when it has the decisions' rates, for
    ``realized_false_alarm_rate`` and ``recall_at_decision``,
    ``<scorer>_<metric>_mean`` and ``_std``; NaN where a scorer did not score a dataset.
    A summary without a ``scorer`` column is :data:`DEFAULT_SCORER`'s. No dataset rows
    give an empty frame with columns ``dataset`` and ``k``.
    """
    if summary.empty:
        return pd.DataFrame(columns=["dataset", "k"])
    means = _with_scorer(summary[summary["level"] == "dataset_mean"])
    if means.empty:
        return pd.DataFrame(columns=["dataset", "k"])
    optional = (*PIXEL_METRICS, *COMPARISON_DECISIONS)
    metrics = COMPARISON_METRICS + tuple(
        m for m in optional if all(f"{m}_{stat}" in means.columns for stat in ("mean", "std")))
    values = [f"{m}_{stat}" for m in metrics for stat in ("mean", "std")]
    # unstack raises on a repeated (dataset, k, scorer): one summary row each, or the input is wrong.
    wide = means.set_index(["dataset", "k", "scorer"])[values].unstack("scorer")
    wide.columns = [f"{scorer}_{value}" for value, scorer in wide.columns]
    columns = [c for scorer in ordered_scorers(means["scorer"])
               for c in _comparison_columns(scorer, metrics)]
    table = wide.reindex(columns=columns).sort_index().reset_index()
    return table.astype({c: "float64" for c in columns})


def _table_scorers(table: pd.DataFrame) -> list[str]:
    """Scorers of a :func:`comparison_table`, in its column order.

    A scorer has every image metric's column: ``inctrl_pixel_auroc_mean`` ends like
    ``<scorer>_auroc_mean`` but there is no ``inctrl_pixel_auprc_mean``.
    """
    suffix = f"_{COMPARISON_METRICS[0]}_mean"
    candidates = [c[: -len(suffix)] for c in table.columns if c.endswith(suffix)]
    names = set(table.columns)
    scorers = [s for s in candidates if set(_comparison_columns(s)) <= names]
    return list(dict.fromkeys(scorers))


def comparison_to_markdown(table: pd.DataFrame) -> str:
    """Render a :func:`comparison_table` as Markdown: one table per metric.

    Each table has a row per (dataset, k) and a column per scorer with
    ``mean ± std`` over seeds (``n/a`` where the scorer has no value). Each pixel
    metric and each decision rate gets a table when the comparison has a value of
    it. An empty table says so in words.
    """
    if table.empty:
        return NO_QUERIES + "\n"
    scorers = _table_scorers(table)
    header = ["dataset", "k", *scorers]
    metrics = [*COMPARISON_METRICS]
    metrics += [m for m in (*PIXEL_METRICS, *COMPARISON_DECISIONS)
                if _has_pixel_metrics(table, [f"{s}_{m}_{stat}" for s in scorers
                                              for stat in ("mean", "std")])]
    sections = []
    for metric in metrics:
        lines = [
            f"## {_TITLES[metric]} (mean over categories; mean ± std over seeds)",
            "",
            "| " + " | ".join(_md_cell(h) for h in header) + " |",
            "|" + "|".join(["---"] * len(header)) + "|",
        ]
        for _, row in table.iterrows():
            cells = [
                row["dataset"],
                row["k"],
                *(_fmt_mean_std(row[f"{s}_{metric}_mean"], row[f"{s}_{metric}_std"]) for s in scorers),
            ]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def write_comparison(table: pd.DataFrame, out_dir: str, *, extra: dict | None = None) -> dict[str, str]:
    """Write ``comparison.parquet``, ``comparison.json`` and ``comparison.md`` into ``out_dir``.

    Same layout as :func:`write_summary`: any fsspec URL, JSON as
    ``{"extra": {...}, "records": [...]}`` with NaN as null. Returns
    ``{"parquet": path, "json": path, "markdown": path}``
    (:func:`pipeline.core.reports.write_report`).
    """
    paths = write_report(table, out_dir, "comparison", comparison_to_markdown(table), extra)
    LOG.info("Wrote comparison of %d rows to %s", len(table), out_dir.rstrip("/"))
    return paths
