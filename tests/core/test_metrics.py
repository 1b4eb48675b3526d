"""Tests for pipeline.core.metrics: metrics against sklearn / brute force, summaries against hand computation."""

from __future__ import annotations

import json
import math

import fsspec
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.core.metrics import (
    DEFAULT_SCORER,
    PIXEL_COLUMNS,
    add_pixel_metrics,
    comparison_table,
    comparison_to_markdown,
    image_metrics,
    summarize_pixel_metrics,
    summarize_scores,
    summary_to_markdown,
    write_summary,
)


def brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over every observed score used as threshold (predict anomalous when score >= t)."""
    best_f1, best_t = -1.0, math.nan
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, t
    return best_f1, best_t


# ---------------------------------------------------------------- image_metrics


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_matches_sklearn_and_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    labels[:2] = [0, 1]
    # Rounded scores force ties, which a sloppy threshold implementation gets wrong.
    scores = np.round(rng.normal(size=60) + 0.8 * labels, 1)

    m = image_metrics(labels, scores)

    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["auprc"] == pytest.approx(average_precision_score(labels, scores))
    f1, _ = brute_force_f1(labels, scores)
    assert m["f1_max"] == pytest.approx(f1)
    # The reported threshold must actually reach f1_max with the >= rule.
    pred = scores >= m["f1_threshold"]
    tp = np.sum(pred & (labels == 1))
    reached = 2 * tp / (2 * tp + np.sum(pred & (labels == 0)) + np.sum(~pred & (labels == 1)))
    assert reached == pytest.approx(m["f1_max"])


def test_image_metrics_perfect_separation() -> None:
    m = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9]))
    assert m == {"auroc": 1.0, "auprc": 1.0, "f1_max": 1.0, "f1_threshold": 0.7}


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_image_metrics_single_class_or_empty_is_nan(labels: list[int]) -> None:
    m = image_metrics(np.array(labels), np.linspace(0, 1, len(labels)))
    assert set(m) == {"auroc", "auprc", "f1_max", "f1_threshold"}
    assert all(math.isnan(v) for v in m.values())


def test_image_metrics_drops_missing_labels_and_scores() -> None:
    labels = np.array([0, 1, np.nan, 0, 1])
    scores = np.array([0.1, 0.9, 0.0, np.nan, 0.8])
    assert image_metrics(labels, scores) == image_metrics(np.array([0, 1, 1]), np.array([0.1, 0.9, 0.8]))


def test_image_metrics_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        image_metrics(np.array([0, 2]), np.array([0.1, 0.2]))


# ---------------------------------------------------------------- summarize_scores

SEEDS = (0, 1, 2)
CATEGORIES = ("bottle", "cable")


def make_scores() -> pd.DataFrame:
    """2 labelled categories of 'mvtec' and 2 unlabelled of 'field', 3 seeds, k=2.

    Each labelled category has 6 queries (2 anomalous, 3 normal, 1 unlabelled);
    scores depend on the seed so per-seed metrics differ.
    Scores are per (query, seed), as the pipeline writes them.
    """
    rng = np.random.default_rng(3)
    rows = []
    for dataset, labelled in (("mvtec", True), ("field", False)):
        for category in CATEGORIES:
            labels = [1, 1, 0, 0, 0, None] if labelled else [None] * 4
            for seed in SEEDS:
                for q, label in enumerate(labels):
                    # A per-category offset makes pooled ranking differ from per-category ranking.
                    base = 0.2 * (label or 0) + (0.3 if category == "cable" else 0.0)
                    rows.append(
                        {
                            "dataset": dataset,
                            "category": category,
                            "k": 2,
                            "seed": seed,
                            "query": f"{category}/{q}",
                            "label": label,
                            "final_score": float(base + rng.uniform()),
                            "fine_score": float(rng.uniform()),
                        }
                    )
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int64")
    return frame


def per_seed_auroc(frame: pd.DataFrame) -> np.ndarray:
    """sklearn AUROC per seed on the labelled rows of ``frame``."""
    values = []
    for seed in SEEDS:
        rows = frame[(frame["seed"] == seed) & frame["label"].notna()]
        values.append(roc_auc_score(rows["label"].astype(int), rows["final_score"]))
    return np.array(values)


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return make_scores()


@pytest.fixture(scope="module")
def summary(scores: pd.DataFrame) -> pd.DataFrame:
    return summarize_scores(scores)


def _row(summary: pd.DataFrame, dataset: str, level: str, category: str) -> pd.Series:
    match = summary[(summary["dataset"] == dataset) & (summary["level"] == level) & (summary["category"] == category)]
    assert len(match) == 1
    return match.iloc[0]


def test_summary_layout_and_sort(summary: pd.DataFrame) -> None:
    keys = list(zip(summary["dataset"], summary["level"], summary["category"]))
    assert keys == [
        ("field", "category", "bottle"),
        ("field", "category", "cable"),
        ("field", "dataset_mean", "*mean*"),
        ("field", "dataset_pooled", "*pooled*"),
        ("mvtec", "category", "bottle"),
        ("mvtec", "category", "cable"),
        ("mvtec", "dataset_mean", "*mean*"),
        ("mvtec", "dataset_pooled", "*pooled*"),
    ]
    for m in ("auroc", "auprc", "f1_max", "f1_threshold"):
        assert {f"{m}_mean", f"{m}_std"} <= set(summary.columns)
    assert (summary["k"] == 2).all()
    assert (summary["n_seeds"] == 3).all()
    assert list(summary.columns[:5]) == ["level", "dataset", "scorer", "category", "k"]


def test_category_metrics_are_mean_and_population_std_over_seeds(
    scores: pd.DataFrame, summary: pd.DataFrame
) -> None:
    for category in CATEGORIES:
        per_seed = per_seed_auroc(scores[(scores["dataset"] == "mvtec") & (scores["category"] == category)])
        row = _row(summary, "mvtec", "category", category)
        assert row["auroc_mean"] == pytest.approx(per_seed.mean())
        assert row["auroc_std"] == pytest.approx(per_seed.std(ddof=0))
        assert per_seed.std(ddof=0) != pytest.approx(per_seed.std(ddof=1))  # the test can tell them apart


def test_category_counts_are_per_seed(summary: pd.DataFrame) -> None:
    row = _row(summary, "mvtec", "category", "bottle")
    assert (row["query_count"], row["anomalous_count"], row["normal_count"], row["unlabeled_count"]) == (6, 2, 3, 1)
    row = _row(summary, "field", "category", "cable")
    assert (row["query_count"], row["anomalous_count"], row["normal_count"], row["unlabeled_count"]) == (4, 0, 0, 4)


def test_dataset_mean_is_mean_of_category_means(scores: pd.DataFrame, summary: pd.DataFrame) -> None:
    mvtec = scores[scores["dataset"] == "mvtec"]
    per_cat = np.stack([per_seed_auroc(mvtec[mvtec["category"] == c]) for c in CATEGORIES])  # (categories, seeds)
    row = _row(summary, "mvtec", "dataset_mean", "*mean*")
    cat_means = summary[(summary["dataset"] == "mvtec") & (summary["level"] == "category")]["auroc_mean"]
    assert row["auroc_mean"] == pytest.approx(cat_means.mean())
    assert row["auroc_std"] == pytest.approx(per_cat.mean(axis=0).std(ddof=0))
    assert (row["query_count"], row["anomalous_count"], row["normal_count"], row["unlabeled_count"]) == (12, 4, 6, 2)


def test_dataset_pooled_uses_all_queries_per_seed(scores: pd.DataFrame, summary: pd.DataFrame) -> None:
    per_seed = per_seed_auroc(scores[scores["dataset"] == "mvtec"])
    row = _row(summary, "mvtec", "dataset_pooled", "*pooled*")
    assert row["auroc_mean"] == pytest.approx(per_seed.mean())
    assert row["auroc_std"] == pytest.approx(per_seed.std(ddof=0))
    assert row["auroc_mean"] != pytest.approx(_row(summary, "mvtec", "dataset_mean", "*mean*")["auroc_mean"])
    assert row["query_count"] == 12


def test_unlabelled_dataset_gets_nan_metrics_and_quantiles(scores: pd.DataFrame, summary: pd.DataFrame) -> None:
    field = summary[summary["dataset"] == "field"]
    metric_cols = [c for c in summary.columns if c.split("_")[0] in ("auroc", "auprc", "f1")]
    assert field[metric_cols].isna().all().all()

    values = scores.loc[scores["dataset"] == "field", "final_score"].to_numpy()
    pooled = _row(summary, "field", "dataset_pooled", "*pooled*")
    assert pooled["score_p50"] == pytest.approx(np.quantile(values, 0.5))
    assert pooled["score_p90"] == pytest.approx(np.quantile(values, 0.9))
    assert pooled["score_p99"] == pytest.approx(np.quantile(values, 0.99))
    assert pooled["score_max"] == pytest.approx(values.max())
    assert pooled["score_mean"] == pytest.approx(values.mean())

    cable = scores[(scores["dataset"] == "field") & (scores["category"] == "cable")]["final_score"]
    assert _row(summary, "field", "category", "cable")["score_p90"] == pytest.approx(np.quantile(cable, 0.9))


def test_summary_respects_score_column_and_k(scores: pd.DataFrame) -> None:
    more = pd.concat([scores, scores.assign(k=4, final_score=scores["fine_score"])], ignore_index=True)
    summary = summarize_scores(more, score_column="fine_score")
    assert (summary["score_column"] == "fine_score").all()
    by_k = summary[(summary["dataset"] == "mvtec") & (summary["level"] == "dataset_pooled")]
    assert list(by_k["k"]) == [2, 4]
    # Both k groups were scored on fine_score, so their metrics agree.
    assert by_k["auroc_mean"].iloc[0] == pytest.approx(by_k["auroc_mean"].iloc[1])
    expected = per_seed_auroc(scores[scores["dataset"] == "mvtec"].assign(final_score=lambda f: f["fine_score"]))
    assert by_k["auroc_mean"].iloc[0] == pytest.approx(expected.mean())


def test_summary_single_seed_has_zero_std(scores: pd.DataFrame) -> None:
    summary = summarize_scores(scores[scores["seed"] == 0])
    row = _row(summary, "mvtec", "category", "bottle")
    assert row["n_seeds"] == 1
    assert row["auroc_std"] == 0.0


def test_dataset_mean_skips_single_class_category(scores: pd.DataFrame) -> None:
    mvtec = scores[scores["dataset"] == "mvtec"].copy()
    mvtec.loc[mvtec["category"] == "cable", "label"] = 0  # cable now has no anomalies
    summary = summarize_scores(mvtec)
    assert np.isnan(_row(summary, "mvtec", "category", "cable")["auroc_mean"])
    bottle = _row(summary, "mvtec", "category", "bottle")
    mean = _row(summary, "mvtec", "dataset_mean", "*mean*")
    assert mean["auroc_mean"] == pytest.approx(bottle["auroc_mean"])
    assert mean["auroc_std"] == pytest.approx(bottle["auroc_std"])


def test_uneven_seeds_report_largest_seed_and_warn(scores: pd.DataFrame, caplog) -> None:
    first = scores.index[(scores["dataset"] == "mvtec") & (scores["category"] == "bottle") & (scores["seed"] == 1)][0]
    with caplog.at_level("WARNING", logger="pipeline.core.metrics"):
        summary = summarize_scores(scores.drop(index=first))
    assert _row(summary, "mvtec", "category", "bottle")["query_count"] == 6
    assert "different query sets" in caplog.text


def test_summary_edge_cases(scores: pd.DataFrame) -> None:
    empty = summarize_scores(scores.iloc[:0])
    assert empty.empty and {"auroc_mean", "scorer"} <= set(empty.columns)
    with pytest.raises(ValueError, match="final_score"):
        summarize_scores(scores.drop(columns="final_score"))


# ---------------------------------------------------------------- per scorer


def two_scorers(scores: pd.DataFrame) -> pd.DataFrame:
    """``scores`` twice: "spade" ranks every anomaly above every normal, "inctrl" the reverse."""
    noise = np.random.default_rng(7).uniform(0, 0.5, size=len(scores))
    anomalous = scores["label"].fillna(0).astype(float).to_numpy()
    perfect = scores.assign(scorer="spade", final_score=anomalous + noise)
    inverted = scores.assign(scorer="inctrl", final_score=-anomalous + noise)
    return pd.concat([perfect, inverted], ignore_index=True)


def _scorer_row(summary: pd.DataFrame, scorer: str, level: str, category: str) -> pd.Series:
    return _row(summary[summary["scorer"] == scorer], "mvtec", level, category)


def test_summary_is_per_scorer(scores: pd.DataFrame) -> None:
    frame = two_scorers(scores)
    summary = summarize_scores(frame)
    assert set(summary["scorer"]) == {"spade", "inctrl"}
    levels = [("category", c) for c in CATEGORIES] + [("dataset_mean", "*mean*"), ("dataset_pooled", "*pooled*")]
    for scorer, expected in (("spade", 1.0), ("inctrl", 0.0)):
        for level, category in levels:
            row = _scorer_row(summary, scorer, level, category)
            assert row["auroc_mean"] == expected, (scorer, level, category)
            assert row["auroc_std"] == 0.0
            assert row["n_seeds"] == 3
        # Counts are one scorer's and one seed's, not summed over scorers.
        assert _scorer_row(summary, scorer, "category", "bottle")["query_count"] == 6
        assert _scorer_row(summary, scorer, "dataset_pooled", "*pooled*")["query_count"] == 12
        values = frame.loc[(frame["scorer"] == scorer) & (frame["dataset"] == "mvtec"), "final_score"]
        assert _scorer_row(summary, scorer, "dataset_pooled", "*pooled*")["score_max"] == pytest.approx(values.max())


def test_summary_sorts_scorers_in_report_order(scores: pd.DataFrame) -> None:
    frame = pd.concat([scores.assign(scorer=name) for name in ("zeta", "spade", "inctrl", "alpha")],
                      ignore_index=True)
    summary = summarize_scores(frame)
    mvtec = summary[summary["dataset"] == "mvtec"]
    keys = list(zip(mvtec["level"], mvtec["scorer"], mvtec["category"]))
    order = ["inctrl", "spade", "alpha", "zeta"]
    expected = [(level, scorer, category)
                for level, categories in (("category", CATEGORIES), ("dataset_mean", ("*mean*",)),
                                          ("dataset_pooled", ("*pooled*",)))
                for scorer in order for category in categories]
    assert keys == expected
    # The same scores give the same metrics whichever scorer they are filed under.
    means = mvtec[mvtec["level"] == "dataset_mean"]["auroc_mean"]
    assert means.nunique() == 1


def test_summary_without_scorer_column_is_default_scorer(scores: pd.DataFrame, summary: pd.DataFrame) -> None:
    assert "scorer" not in scores.columns
    assert DEFAULT_SCORER == "inctrl"
    assert (summary["scorer"] == "inctrl").all()
    pd.testing.assert_frame_equal(summary, summarize_scores(scores.assign(scorer="inctrl")))


def test_rows_without_scorer_count_as_default_scorer(scores: pd.DataFrame, summary: pd.DataFrame) -> None:
    # An old table (no scorer column) concatenated with a new one leaves NaN scorers.
    new = scores.assign(scorer="padim", final_score=scores["fine_score"])
    mixed = summarize_scores(pd.concat([scores, new], ignore_index=True))
    old = mixed[mixed["scorer"] == "inctrl"].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, summary)
    padim = mixed[mixed["scorer"] == "padim"].reset_index(drop=True)
    pd.testing.assert_frame_equal(padim, summarize_scores(new).reset_index(drop=True))
    assert set(mixed["scorer"]) == {"inctrl", "padim"}


def test_markdown_has_a_row_per_scorer(scores: pd.DataFrame) -> None:
    md = summary_to_markdown(summarize_scores(two_scorers(scores)))
    assert "| mvtec | spade | bottle | 2 |" in md
    assert "| mvtec | inctrl | bottle | 2 |" in md
    assert "| mvtec | spade | *mean* | 2 | 12 | 4 | 1.000 ± 0.000 |" in md


# ---------------------------------------------------------------- markdown and writing


def test_markdown_formats_metrics_and_unlabelled_rows(summary: pd.DataFrame) -> None:
    md = summary_to_markdown(summary)
    lines = md.strip().splitlines()
    assert lines[0] == "| dataset | scorer | category | k | queries | anomalous | AUROC | AUPRC | F1-max |"
    assert len(lines) == 2 + len(summary)
    row = _row(summary, "mvtec", "category", "bottle")
    assert f"{row['auroc_mean']:.3f} ± {row['auroc_std']:.3f}" in md
    field = next(line for line in lines if line.startswith("| field | inctrl | cable |"))
    assert "p50=" in field and "p90=" in field and "max=" in field and "±" not in field


def test_markdown_shows_na_for_missing_metric(summary: pd.DataFrame) -> None:
    broken = summary.copy()
    broken.loc[(broken["dataset"] == "mvtec") & (broken["category"] == "bottle"), "auprc_mean"] = np.nan
    line = next(l for l in summary_to_markdown(broken).splitlines() if l.startswith("| mvtec | inctrl | bottle |"))
    assert line.split(" | ")[7] == "n/a"


def test_write_summary_round_trips(tmp_path, summary: pd.DataFrame) -> None:
    out_dir = tmp_path / "nested" / "run"
    paths = write_summary(summary, str(out_dir), extra={"run_id": "r1", "model_id": "ViT-B-16", "x": float("nan")})
    assert set(paths) == {"parquet", "json", "markdown"}

    back = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(back, summary, check_dtype=False)

    with open(paths["json"]) as f:
        doc = json.load(f)
    assert doc["extra"] == {"run_id": "r1", "model_id": "ViT-B-16", "x": None}
    assert len(doc["records"]) == len(summary)
    field = next(r for r in doc["records"] if r["dataset"] == "field")
    assert field["auroc_mean"] is None

    md = (out_dir / "summary.md").read_text()
    assert "| dataset | scorer | category | k |" in md
    assert "±" in md and "p50=" in md


def test_write_summary_goes_through_fsspec(summary: pd.DataFrame) -> None:
    paths = write_summary(summary, "memory://metrics-test/run/")
    assert paths["json"] == "memory://metrics-test/run/summary.json"
    with fsspec.open(paths["parquet"], "rb") as f:
        assert len(pd.read_parquet(f)) == len(summary)
    with fsspec.open(paths["json"], "r") as f:
        assert json.load(f)["extra"] == {}


def test_an_empty_summary_says_no_queries_in_words():
    from pipeline.core.metrics import NO_QUERIES, summarize_scores, summary_to_markdown

    empty = summarize_scores(pd.DataFrame(columns=["dataset", "category", "k", "seed", "label",
                                                   "final_score"]))
    assert empty.empty
    assert summary_to_markdown(empty).strip() == NO_QUERIES


# ---------------------------------------------------------------- pixel metrics

# Per seed (0, 1, 2): mvtec/bottle and mvtec/cable have masks, field has none (NaN).
BOTTLE_PIXEL = np.array([0.90, 0.80, 0.85])
CABLE_PIXEL = np.array([0.70, 0.75, 0.60])
BOTTLE_PRO = np.array([0.60, 0.50, 0.40])
CABLE_PRO = np.array([0.30, 0.35, 0.20])


def make_pixel_per_seed(scorer: str = "inctrl") -> pd.DataFrame:
    rows = []
    for seed in SEEDS:
        for category, auroc, pro in (("bottle", BOTTLE_PIXEL, BOTTLE_PRO),
                                     ("cable", CABLE_PIXEL, CABLE_PRO)):
            rows.append({"dataset": "mvtec", "scorer": scorer, "category": category, "k": 2,
                         "seed": seed, "pixel_auroc": auroc[seed], "aupro": pro[seed],
                         "pixel_aupr": auroc[seed] / 2, "pixel_f1_max": pro[seed] / 3,
                         "pixel_images": 5 if category == "bottle" else 4})
            rows.append({"dataset": "field", "scorer": scorer, "category": category, "k": 2,
                         "seed": seed, "pixel_auroc": math.nan, "aupro": math.nan,
                         "pixel_aupr": math.nan, "pixel_f1_max": math.nan,
                         "pixel_images": 4})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def pixel_summary() -> pd.DataFrame:
    return summarize_pixel_metrics(make_pixel_per_seed())


def test_pixel_summary_levels_are_means_and_population_stds(pixel_summary: pd.DataFrame) -> None:
    assert list(pixel_summary.columns) == ["level", "dataset", "scorer", "category", "k",
                                           *PIXEL_COLUMNS]
    assert set(pixel_summary["level"]) == {"category", "dataset_mean"}
    bottle = _row(pixel_summary, "mvtec", "category", "bottle")
    assert bottle["pixel_auroc_mean"] == pytest.approx(BOTTLE_PIXEL.mean())
    assert bottle["pixel_auroc_std"] == pytest.approx(BOTTLE_PIXEL.std(ddof=0))
    assert bottle["aupro_mean"] == pytest.approx(BOTTLE_PRO.mean())
    assert bottle["aupro_std"] == pytest.approx(BOTTLE_PRO.std(ddof=0))
    assert bottle["pixel_images"] == 5

    mean = _row(pixel_summary, "mvtec", "dataset_mean", "*mean*")
    per_seed = (BOTTLE_PIXEL + CABLE_PIXEL) / 2
    assert mean["pixel_auroc_mean"] == pytest.approx(per_seed.mean())
    assert mean["pixel_auroc_std"] == pytest.approx(per_seed.std(ddof=0))
    # The std of the per-seed category mean, not the mean of the category stds.
    assert per_seed.std(ddof=0) != pytest.approx((BOTTLE_PIXEL.std() + CABLE_PIXEL.std()) / 2)
    assert mean["aupro_mean"] == pytest.approx(((BOTTLE_PRO + CABLE_PRO) / 2).mean())
    assert mean["pixel_images"] == 9

    field = pixel_summary[pixel_summary["dataset"] == "field"]
    assert field[["pixel_auroc_mean", "aupro_mean", "aupro_std"]].isna().all().all()


def test_pixel_dataset_mean_skips_categories_without_masks() -> None:
    frame = make_pixel_per_seed()
    frame.loc[frame["category"] == "cable", ["pixel_auroc", "aupro"]] = math.nan
    mean = _row(summarize_pixel_metrics(frame), "mvtec", "dataset_mean", "*mean*")
    assert mean["pixel_auroc_mean"] == pytest.approx(BOTTLE_PIXEL.mean())
    assert mean["aupro_std"] == pytest.approx(BOTTLE_PRO.std(ddof=0))


def test_pixel_summary_edge_cases() -> None:
    frame = make_pixel_per_seed()
    with pytest.raises(ValueError, match="aupro"):
        summarize_pixel_metrics(frame.drop(columns="aupro"))
    with pytest.raises(ValueError, match="twice"):
        summarize_pixel_metrics(pd.concat([frame, frame.iloc[:1]], ignore_index=True))
    empty = summarize_pixel_metrics(frame.iloc[:0])
    assert empty.empty and list(empty.columns) == list(summarize_pixel_metrics(frame).columns)


@pytest.fixture(scope="module")
def with_pixels(summary: pd.DataFrame, pixel_summary: pd.DataFrame) -> pd.DataFrame:
    return add_pixel_metrics(summary, pixel_summary)


def test_add_pixel_metrics_is_a_left_join(summary, pixel_summary, with_pixels) -> None:
    pd.testing.assert_frame_equal(with_pixels[list(summary.columns)], summary)
    assert list(with_pixels.columns) == [*summary.columns, *PIXEL_COLUMNS]
    for level, category in (("category", "bottle"), ("dataset_mean", "*mean*")):
        got, want = _row(with_pixels, "mvtec", level, category), _row(pixel_summary, "mvtec", level, category)
        for column in PIXEL_COLUMNS:
            assert got[column] == want[column], (level, column)
    pooled = _row(with_pixels, "mvtec", "dataset_pooled", "*pooled*")
    assert pooled[list(PIXEL_COLUMNS)].isna().all()
    assert str(with_pixels["pixel_images"].dtype) == "Int64"
    # Adding again replaces, it does not duplicate.
    pd.testing.assert_frame_equal(add_pixel_metrics(with_pixels, pixel_summary), with_pixels)


def test_add_pixel_metrics_without_pixel_rows_gives_nan_columns(summary, pixel_summary) -> None:
    other_scorer = add_pixel_metrics(summary, pixel_summary.assign(scorer="spade"))
    assert other_scorer[list(PIXEL_COLUMNS)].isna().all().all()
    empty = add_pixel_metrics(summary, summarize_pixel_metrics(make_pixel_per_seed().iloc[:0]))
    assert empty[list(PIXEL_COLUMNS)].isna().all().all()
    assert len(empty) == len(summary)
    with pytest.raises(ValueError, match="twice"):
        add_pixel_metrics(summary, pd.concat([pixel_summary, pixel_summary.iloc[:1]]))


def test_markdown_shows_pixel_columns_only_when_there_are_values(summary, pixel_summary,
                                                                 with_pixels) -> None:
    md = summary_to_markdown(with_pixels)
    lines = md.strip().splitlines()
    assert lines[0] == ("| dataset | scorer | category | k | queries | anomalous | AUROC | AUPRC | "
                        "F1-max | Pixel AUROC | AUPRO | Pixel AUPR | Pixel F1-max |")
    bottle = next(line for line in lines if line.startswith("| mvtec | inctrl | bottle |"))
    cells = [c.strip() for c in bottle.strip("|").split("|")]
    row = _row(pixel_summary, "mvtec", "category", "bottle")
    assert cells[-4:] == [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}"
                          for m in ("pixel_auroc", "aupro", "pixel_aupr", "pixel_f1_max")]
    pooled = next(line for line in lines if line.startswith("| mvtec | inctrl | *pooled* |"))
    assert pooled.endswith("| n/a | n/a | n/a | n/a |")
    no_values = add_pixel_metrics(summary, pixel_summary.assign(scorer="spade"))
    assert summary_to_markdown(no_values) == summary_to_markdown(summary)


def test_comparison_gains_pixel_columns_and_tables(scores, pixel_summary) -> None:
    frame = two_scorers(scores)
    summary = summarize_scores(frame)
    pixels = pd.concat([pixel_summary, summarize_pixel_metrics(make_pixel_per_seed("spade")
                                                               .assign(aupro=math.nan))])
    table = comparison_table(add_pixel_metrics(summary, pixels))
    per_scorer = ["auroc_mean", "auroc_std", "auprc_mean", "auprc_std", "pixel_auroc_mean",
                  "pixel_auroc_std", "aupro_mean", "aupro_std", "pixel_aupr_mean",
                  "pixel_aupr_std", "pixel_f1_max_mean", "pixel_f1_max_std"]
    assert list(table.columns) == ["dataset", "k", *(f"{s}_{c}" for s in ("inctrl", "spade")
                                                     for c in per_scorer)]
    mvtec = table[table["dataset"] == "mvtec"].iloc[0]
    assert mvtec["inctrl_pixel_auroc_mean"] == pytest.approx(((BOTTLE_PIXEL + CABLE_PIXEL) / 2).mean())
    assert mvtec["inctrl_aupro_std"] == pytest.approx(((BOTTLE_PRO + CABLE_PRO) / 2).std(ddof=0))
    assert math.isnan(mvtec["spade_aupro_mean"])
    assert mvtec["inctrl_pixel_aupr_mean"] == pytest.approx(
        ((BOTTLE_PIXEL + CABLE_PIXEL) / 4).mean())
    assert mvtec["inctrl_pixel_f1_max_std"] == pytest.approx(
        ((BOTTLE_PRO + CABLE_PRO) / 6).std(ddof=0))

    md = comparison_to_markdown(table)
    assert "| dataset | k | inctrl | spade |" in md  # no "inctrl_pixel" scorer
    assert "## Pixel AUROC (mean over categories" in md and "## AUPRO (mean over categories" in md
    assert "## Pixel AUPR (mean over categories" in md and "## Pixel F1-max (mean" in md
    aupro = md.split("## AUPRO")[1]
    expected = ((BOTTLE_PRO + CABLE_PRO) / 2)
    assert f"| mvtec | 2 | {expected.mean():.3f} ± {expected.std():.3f} | n/a |" in aupro

    plain = comparison_table(summary)
    assert not any("pixel" in c or "aupro" in c for c in plain.columns)
    assert "Pixel" not in comparison_to_markdown(plain)
    no_masks = comparison_table(add_pixel_metrics(summary, pixel_summary.iloc[:0]))
    assert "inctrl_aupro_mean" in no_masks.columns
    assert comparison_to_markdown(no_masks) == comparison_to_markdown(plain)


def test_write_summary_round_trips_pixel_columns(tmp_path, with_pixels) -> None:
    paths = write_summary(with_pixels, str(tmp_path / "run"))
    back = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(back, with_pixels, check_dtype=False)
    with open(paths["json"]) as f:
        records = json.load(f)["records"]
    pooled = next(r for r in records if r["dataset"] == "mvtec" and r["level"] == "dataset_pooled")
    assert pooled["pixel_images"] is None and pooled["aupro_mean"] is None
    bottle = next(r for r in records if r["dataset"] == "mvtec" and r["category"] == "bottle")
    assert bottle["pixel_images"] == 5
