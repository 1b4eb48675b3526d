"""The report splits its tables by dataset once (``inputs.ByDataset``) instead of scanning
them per dataset and section (issue 22). The reference is the scan it replaces, pandas'
``frame[frame["dataset"].astype(str) == name]``: the same rows, in the same order, with the
same index and dtypes, for every name the report asks, including names with no rows and
missing names (which ``astype(str)`` writes ``None`` / ``nan``)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.report.inputs import ByDataset, Night, RunInputs
from pipeline.report.sections import dataset_section, dataset_view


def _scan(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame[frame["dataset"].astype(str) == name]


def _interleaved() -> pd.DataFrame:
    # Datasets interleaved as a shuffled manifest leaves them, a missing name of each kind,
    # a name that reads like a missing one, and an index that is not 0..n.
    names = ["b", "a", None, "b", np.nan, "a", "nan", "c", "b", "None"]
    return pd.DataFrame({
        "dataset": names, "final_score": np.arange(len(names), dtype=float) / 10,
        "label": pd.array([1, 0, None, 1, 0, None, 1, 0, 0, 1], dtype="Int64"),
        "reference_ids": [[str(i)] for i in range(len(names))]},
        index=np.arange(100, 100 + 2 * len(names), 2))


@pytest.mark.parametrize("name", ["a", "b", "c", "None", "nan", "absent", ""])
def test_each_dataset_gets_exactly_the_rows_the_scan_gives(name):
    frame = _interleaved()
    got = ByDataset(frame)[name]
    pd.testing.assert_frame_equal(got, _scan(frame, name))
    assert got.index.dtype == _scan(frame, name).index.dtype


def test_rows_keep_the_tables_order_and_each_named_row_lands_once():
    frame = _interleaved()
    by = ByDataset(frame)
    assert by["b"]["final_score"].tolist() == [0.0, 0.3, 0.8]
    assert by["None"]["final_score"].tolist() == [0.9]  # a name, not a missing one
    names = frame["dataset"].astype(str)
    split = pd.concat([by[n] for n in names.dropna().unique()])
    assert sorted(split.index) == sorted(frame.index[names.notna()])


def test_a_name_without_rows_is_an_empty_frame_of_the_same_columns_and_dtypes():
    frame = _interleaved()
    empty = ByDataset(frame)["absent"]
    assert empty.empty and list(empty.columns) == list(frame.columns)
    assert empty.dtypes.equals(frame.dtypes)
    assert ByDataset(frame.iloc[:0])["a"].empty


def test_a_table_without_a_dataset_column_fails_when_asked_as_the_scan_did():
    by = ByDataset(pd.DataFrame({"final_score": [0.1]}))  # splitting waits for a question
    with pytest.raises(KeyError):
        by["a"]


def _inputs(scores, summary=None, errors=None) -> RunInputs:
    return RunInputs(output="/nowhere", run_date="2024-05-01", scores=scores, errors=errors,
                     summary=summary, summary_extra={}, comparison=None, drift=None,
                     drift_extra={}, nightly=None,
                     history=(Night("2024-05-01", summary, None),), scorers=("inctrl",))


def test_run_inputs_and_nights_answer_per_table():
    scores = _interleaved().assign(scorer="inctrl")
    errors = pd.DataFrame({"dataset": ["a", "c", "a"], "stage": ["score"] * 3})
    inputs = _inputs(scores, errors=errors)
    assert len(inputs.rows_of("errors", "a")) == 2 and inputs.rows_of("errors", "b").empty
    with pytest.raises(ValueError, match="no summary"):
        inputs.rows_of("summary", "a")  # a table the date does not have
    night = inputs.history[0]
    assert night.rows_of("summary", "a") is None and night.rows_of("drift", "a") is None
    night = Night("2024-05-01", pd.DataFrame({"level": ["x"]}), None)
    assert night.rows_of("summary", "a") is None  # no dataset column: no rows to show


def _summary(dataset: str, score: float) -> dict:
    return {"dataset": dataset, "scorer": "inctrl", "category": "c", "k": 4,
            "level": "dataset_mean", "query_count": 4, "auroc_mean": score, "auroc_std": 0.0}


def test_a_datasets_section_is_the_same_beside_other_datasets_as_alone():
    # What a dataset's section shows depends on its own rows only: rendered from a run of
    # three interleaved datasets it equals the section rendered from its rows alone.
    rng = np.random.default_rng(0)
    names = rng.permutation(["a"] * 8 + ["b"] * 8 + ["c"] * 8).tolist()
    scores = pd.DataFrame({
        "dataset": names, "scorer": "inctrl", "seed": 0, "category": "c",
        "image_id": [f"q{i}" for i in range(len(names))], "label": [i % 2 for i in
                                                                    range(len(names))],
        "final_score": rng.random(len(names))})
    summary = pd.DataFrame([_summary(d, s) for d, s in (("b", 0.7), ("a", 0.6), ("c", 0.8))])
    errors = pd.DataFrame({"dataset": ["c", "a", "c"], "stage": ["read"] * 3,
                           "reason": ["gone"] * 3})
    everything = _inputs(scores, summary, errors)
    for name in ("a", "b", "c"):
        alone = _inputs(scores[scores["dataset"] == name], summary[summary["dataset"] == name],
                        errors[errors["dataset"] == name])
        assert (dataset_section(everything, dataset_view(everything, name), 1, 3, {}, "")
                == dataset_section(alone, dataset_view(alone, name), 1, 3, {}, ""))
