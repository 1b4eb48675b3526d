"""SummarizeMetrics summarises several datasets in one pandas pass (issue 22: pandas' cost
per call, paid per product line, made a run's time grow with its lines). A pass over several
datasets must give every dataset exactly the rows it gets alone: every grouping of
``summarize_scores`` and ``summarize_decisions`` is keyed by dataset, and these tests would
catch one that is not (a pooled level, a mean or a threshold leaking across datasets)."""
from __future__ import annotations

import glob
import random

import apache_beam as beam
import pandas as pd

import transforms.summary as summary_module
from transforms.summary import _KEEP, SummarizeMetrics, _compact, _summarize_datasets

ORDER = ["dataset", "level", "scorer", "category", "k"]


def _records(dataset: str, seed: int) -> list[dict]:
    """Score records of one dataset: 1-3 categories, two scorers, two seeds, labels of both
    kinds (one category single-class), decisions on some rows and none on others."""
    rng = random.Random(seed)
    out = []
    for category in [f"c{i}" for i in range(rng.randint(1, 3))]:
        single_class = rng.random() < 0.3
        for scorer in ("inctrl", "patchcore"):
            for s in (0, 1):
                for q in range(rng.randint(3, 7)):
                    label = 0 if single_class else (q % 2 if q < 4 else rng.choice([0, 1, None]))
                    decided = rng.random() < 0.7
                    out.append({
                        "dataset": dataset, "scorer": scorer, "category": category, "k": 2,
                        "seed": s, "label": label, "final_score": rng.random() + 0.3 * (label or 0),
                        "fine_score": rng.random(), "image_residual_score": rng.random(),
                        "text_prior_score": rng.random(),
                        "is_anomalous": (rng.random() < 0.4) if decided else None,
                        "calibration_size": rng.randint(5, 30) if decided else None,
                        "decision_threshold": rng.random() if decided else None,
                        "pixel_decision_threshold": None,
                        "false_alarm_rate": 0.05 if decided else None})
    return out


def _grouped(records: list[dict]) -> list[tuple[str, list[tuple]]]:
    by: dict[str, list[tuple]] = {}
    for r in records:
        key, row = _compact(r)
        by.setdefault(key, []).append(row)
    return sorted(by.items())


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(ORDER, kind="stable").reset_index(drop=True)


def _assert_same(got: pd.DataFrame, want: pd.DataFrame, **kwargs) -> None:
    """Every column exactly equal but ``score_mean``: pandas' grouped mean of the scores can
    round its last bit differently when other groups share the frame (measured: at most
    1.1e-16 on scores in [0, 1.3]); that column within 1e-15."""
    got, want = got[want.columns.tolist()], want
    exact = [c for c in want.columns if c != "score_mean"]
    pd.testing.assert_frame_equal(got[exact], want[exact], check_exact=True, **kwargs)
    pd.testing.assert_series_equal(got["score_mean"], want["score_mean"], check_exact=False,
                                   rtol=0, atol=1e-15, **kwargs)


def test_one_pass_over_many_datasets_equals_each_dataset_alone():
    records = [r for i in range(12) for r in _records(f"line{i:02d}", seed=i)]
    groups = _grouped(records)
    together = _sorted(_summarize_datasets(groups))
    alone = _sorted(pd.concat([_summarize_datasets([g]) for g in groups], ignore_index=True))
    assert set(together["dataset"]) == {f"line{i:02d}" for i in range(12)}
    _assert_same(together, alone)


def test_no_rows_still_has_the_summary_columns():
    empty = _summarize_datasets([])
    assert empty.empty and {"dataset", "level", "auroc_mean"} <= set(empty.columns)
    assert list(_KEEP[:3]) == ["dataset", "scorer", "category"]


def test_the_transform_batches_datasets_and_loses_none(tmp_path, monkeypatch):
    """Seven datasets in passes of three (3 + 3 + 1): the written summary equals each dataset
    summarised alone."""
    monkeypatch.setattr(summary_module, "DATASETS_PER_PASS", 3)
    records = [r for i in range(7) for r in _records(f"line{i}", seed=100 + i)]
    out = str(tmp_path / "summary")
    with beam.Pipeline() as p:
        _ = (p | beam.Create(records) | SummarizeMetrics(out, extra={"run_id": "t"}))
    (path,) = glob.glob(f"{out}/summary.parquet")
    written = _sorted(pd.read_parquet(path))
    alone = _sorted(pd.concat([_summarize_datasets([g]) for g in _grouped(records)],
                              ignore_index=True))
    assert sorted(set(written["dataset"])) == [f"line{i}" for i in range(7)]
    _assert_same(written, alone, check_dtype=False)
