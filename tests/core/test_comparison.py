"""Tests for the scorer comparison in pipeline.core.metrics: values against hand computation."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pandas as pd
import pytest

from pipeline.core.metrics import (
    NO_QUERIES,
    comparison_table,
    comparison_to_markdown,
    summarize_scores,
    write_comparison,
)
from pipeline.model.scorers.registry import scorer_names

# Two normals and two anomalies per (category, seed); the AUROC is the share of the
# four (anomaly, normal) pairs ranked right, the AUPRC the mean precision at each anomaly.
PERFECT = ([0.1, 0.2], [0.8, 0.9])  # AUROC 1,   AUPRC 1
HALF = ([0.1, 0.6], [0.2, 0.3])  # AUROC 1/2, AUPRC (1/2 + 2/3) / 2 = 7/12
THREE_QUARTERS = ([0.1, 0.6], [0.5, 0.9])  # AUROC 3/4, AUPRC (1 + 2/3) / 2 = 5/6

# mvtec, per seed (bottle, cable): seed 0 (PERFECT, THREE_QUARTERS), seed 1 (HALF, THREE_QUARTERS).
# inctrl: dataset value per seed = mean over categories, then mean / std(ddof=0) over seeds.
INCTRL_AUROC = np.array([(1 + 3 / 4) / 2, (1 / 2 + 3 / 4) / 2])  # 0.875, 0.625
INCTRL_AUPRC = np.array([(1 + 5 / 6) / 2, (7 / 12 + 5 / 6) / 2])  # 11/12, 17/24
# spade scores are inctrl's negated: AUROC 1 - x; inverted AUPRCs are PERFECT 5/12,
# HALF 7/12, THREE_QUARTERS 1/2 (same rule, anomalies now ranked low).
SPADE_AUROC = np.array([(0 + 1 / 4) / 2, (1 / 2 + 1 / 4) / 2])  # 0.125, 0.375
SPADE_AUPRC = np.array([(5 / 12 + 1 / 2) / 2, (7 / 12 + 1 / 2) / 2])  # 11/24, 13/24


def _rows(dataset: str, category: str, seed: int, scorer: str, case: tuple, sign: float = 1.0,
          k: int = 1) -> list[dict]:
    normals, anomalies = case
    return [
        {"dataset": dataset, "category": category, "k": k, "seed": seed, "scorer": scorer,
         "query": f"{category}/{i}", "label": label, "final_score": sign * score}
        for i, (label, score) in enumerate([(0, s) for s in normals] + [(1, s) for s in anomalies])
    ]


def make_scores() -> pd.DataFrame:
    """mvtec (2 categories) scored by spade and inctrl, visa (1 category) by inctrl only; 2 seeds."""
    rows = []
    for scorer, sign in (("spade", -1.0), ("inctrl", 1.0)):  # spade first: order must not leak
        for seed, bottle in ((0, PERFECT), (1, HALF)):
            rows += _rows("mvtec", "bottle", seed, scorer, bottle, sign)
            rows += _rows("mvtec", "cable", seed, scorer, THREE_QUARTERS, sign)
    for seed in (0, 1):
        rows += _rows("visa", "candle", seed, "inctrl", PERFECT)
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int64")
    return frame


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    return summarize_scores(make_scores())


@pytest.fixture(scope="module")
def table(summary: pd.DataFrame) -> pd.DataFrame:
    return comparison_table(summary)


def test_comparison_layout(table: pd.DataFrame) -> None:
    assert list(table.columns) == [
        "dataset", "k",
        "inctrl_auroc_mean", "inctrl_auroc_std", "inctrl_auprc_mean", "inctrl_auprc_std",
        "spade_auroc_mean", "spade_auroc_std", "spade_auprc_mean", "spade_auprc_std",
    ]
    assert list(zip(table["dataset"], table["k"])) == [("mvtec", 1), ("visa", 1)]


def test_comparison_is_mean_over_categories_then_seeds(table: pd.DataFrame) -> None:
    mvtec = table.set_index("dataset").loc["mvtec"]
    expected = {
        "inctrl_auroc": INCTRL_AUROC, "inctrl_auprc": INCTRL_AUPRC,
        "spade_auroc": SPADE_AUROC, "spade_auprc": SPADE_AUPRC,
    }
    for column, per_seed in expected.items():
        assert mvtec[f"{column}_mean"] == pytest.approx(per_seed.mean()), column
        assert mvtec[f"{column}_std"] == pytest.approx(per_seed.std(ddof=0)), column
    # The same numbers written out, so a wrong per-seed list above cannot hide a bug.
    assert (mvtec["inctrl_auroc_mean"], mvtec["inctrl_auroc_std"]) == pytest.approx((0.75, 0.125))
    assert (mvtec["inctrl_auprc_mean"], mvtec["inctrl_auprc_std"]) == pytest.approx((39 / 48, 5 / 48))
    assert (mvtec["spade_auroc_mean"], mvtec["spade_auroc_std"]) == pytest.approx((0.25, 0.125))
    assert (mvtec["spade_auprc_mean"], mvtec["spade_auprc_std"]) == pytest.approx((0.5, 1 / 24))


def test_comparison_uses_dataset_mean_not_pooled(summary: pd.DataFrame, table: pd.DataFrame) -> None:
    pooled = summary[(summary["level"] == "dataset_pooled") & (summary["dataset"] == "mvtec")
                     & (summary["scorer"] == "inctrl")].iloc[0]
    assert pooled["auroc_mean"] != pytest.approx(table.loc[table["dataset"] == "mvtec", "inctrl_auroc_mean"].item())


def test_missing_scorer_is_nan(table: pd.DataFrame) -> None:
    visa = table.set_index("dataset").loc["visa"]
    assert (visa["inctrl_auroc_mean"], visa["inctrl_auroc_std"]) == (1.0, 0.0)
    assert visa[[c for c in table.columns if c.startswith("spade_")]].isna().all()


def test_scorer_columns_follow_scorer_order_then_alphabet() -> None:
    scores = make_scores()
    scores = scores[scores["scorer"] == "inctrl"]
    names = ("zeta", "patchcore", "alpha", "inctrl", "winclip")
    frame = pd.concat([scores.assign(scorer=name) for name in names], ignore_index=True)
    table = comparison_table(summarize_scores(frame))
    order = [c[: -len("_auroc_mean")] for c in table.columns if c.endswith("_auroc_mean")]
    assert order == ["inctrl", "patchcore", "winclip", "alpha", "zeta"]
    assert scorer_names().index("patchcore") < scorer_names().index("winclip")


def test_comparison_has_a_row_per_dataset_and_k() -> None:
    scores = make_scores()
    table = comparison_table(summarize_scores(pd.concat([scores, scores.assign(k=4)], ignore_index=True)))
    assert list(zip(table["dataset"], table["k"])) == [("mvtec", 1), ("mvtec", 4), ("visa", 1), ("visa", 4)]
    by_k = table[table["dataset"] == "mvtec"]["inctrl_auroc_mean"]
    assert list(by_k) == pytest.approx([0.75, 0.75])


def test_summary_without_scorer_column_compares_as_inctrl(summary: pd.DataFrame) -> None:
    legacy = summary[summary["scorer"] == "inctrl"].drop(columns="scorer")
    table = comparison_table(legacy)
    assert list(table.columns) == ["dataset", "k", "inctrl_auroc_mean", "inctrl_auroc_std",
                                   "inctrl_auprc_mean", "inctrl_auprc_std"]
    assert table.loc[table["dataset"] == "mvtec", "inctrl_auroc_mean"].item() == pytest.approx(0.75)


def test_empty_summary_gives_empty_comparison() -> None:
    empty = summarize_scores(make_scores().iloc[:0])
    table = comparison_table(empty)
    assert table.empty and list(table.columns) == ["dataset", "k"]
    assert comparison_to_markdown(table).strip() == NO_QUERIES


# ---------------------------------------------------------------- markdown and writing


def test_markdown_has_a_table_per_metric(table: pd.DataFrame) -> None:
    md = comparison_to_markdown(table)
    for name in ("mvtec", "visa", "inctrl", "spade", "AUROC", "AUPRC"):
        assert name in md
    auroc, auprc = md.split("## AUPRC")
    assert auroc.startswith("## AUROC")
    assert "| dataset | k | inctrl | spade |" in auroc and "| dataset | k | inctrl | spade |" in auprc
    assert "| mvtec | 1 | 0.750 ± 0.125 | 0.250 ± 0.125 |" in auroc
    assert "| visa | 1 | 1.000 ± 0.000 | n/a |" in auroc
    assert f"| mvtec | 1 | {39 / 48:.3f} ± {5 / 48:.3f} | 0.500 ± {1 / 24:.3f} |" in auprc


def test_write_comparison_round_trips(tmp_path, table: pd.DataFrame) -> None:
    out_dir = tmp_path / "nested" / "run"
    paths = write_comparison(table, str(out_dir), extra={"run_id": "r1", "x": float("nan")})
    assert set(paths) == {"parquet", "json", "markdown"}
    assert sorted(p.name for p in out_dir.iterdir()) == ["comparison.json", "comparison.md", "comparison.parquet"]

    pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), table, check_dtype=False)
    with open(paths["json"]) as f:
        doc = json.load(f)
    assert doc["extra"] == {"run_id": "r1", "x": None}
    assert len(doc["records"]) == len(table)
    visa = next(r for r in doc["records"] if r["dataset"] == "visa")
    assert visa["spade_auroc_mean"] is None and visa["inctrl_auroc_mean"] == 1.0
    assert (out_dir / "comparison.md").read_text() == comparison_to_markdown(table)


def test_write_comparison_goes_through_fsspec(table: pd.DataFrame) -> None:
    paths = write_comparison(table, "memory://comparison-test/run/")
    assert paths["json"] == "memory://comparison-test/run/comparison.json"
    with fsspec.open(paths["parquet"], "rb") as f:
        assert len(pd.read_parquet(f)) == len(table)
    with fsspec.open(paths["json"], "r") as f:
        assert json.load(f)["extra"] == {}


def test_write_empty_comparison(tmp_path) -> None:
    paths = write_comparison(pd.DataFrame(columns=["dataset", "k"]), str(tmp_path))
    assert pd.read_parquet(paths["parquet"]).empty
    with open(paths["markdown"]) as f:
        assert f.read().strip() == NO_QUERIES
