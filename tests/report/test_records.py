"""``sections.records`` replaces ``DataFrame.to_dict("records")`` in the report for speed
(issue 22: it was most of the report's time per product line); pandas' own ``to_dict`` is the
reference: the same rows, the same values, the same Python types, for every dtype a score
table carries (nullable integers and booleans, lists, datetimes, strings, categories)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.report.sections import records


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "score": [0.25, np.nan, 1.5], "label": pd.array([1, None, 0], dtype="Int64"),
        "flag": pd.array([True, None, False], dtype="boolean"), "obj": [True, None, 3],
        "ids": [["a", "b"], None, np.array(["c"])], "when": pd.to_datetime(
            ["2024-01-01", None, "2024-01-03"]), "name": ["x", None, "z"],
        "seed": np.array([0, 1, 2], dtype=np.int64), "f32": np.array([0.5, np.nan, 1.5],
                                                                      dtype=np.float32),
        "text": pd.array(["a", None, "c"], dtype="string"),
        "cat": pd.Categorical(["u", None, "u"])})


def test_records_are_to_dicts_records_value_for_value():
    frame = _frame()
    want, got = frame.to_dict("records"), records(frame)
    assert len(got) == len(want) == 3
    for w, g in zip(want, got):
        assert list(g) == list(w)
        for column in w:
            assert type(g[column]) is type(w[column]), column
            assert repr(g[column]) == repr(w[column]), column


def test_edge_frames():
    frame = _frame()
    assert records(frame.iloc[:0]) == frame.iloc[:0].to_dict("records") == []
    no_columns = pd.DataFrame(index=range(2))
    assert records(no_columns) == no_columns.to_dict("records") == [{}, {}]
    subset = frame[frame["seed"] > 0]  # a filtered view, its index not 0..n
    assert [r["seed"] for r in records(subset)] == [1, 2]
