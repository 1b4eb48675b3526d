"""The report trio (Parquet, strict JSON, Markdown) and the JSON cleaning."""
from __future__ import annotations

import json
import math

import fsspec
import numpy as np
import pandas as pd

from pipeline.core.reports import jsonable, write_report


def test_jsonable_makes_strict_json():
    value = {"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf,
             "np": np.float32("nan"), "int": np.int64(3), "nested": [1.5, (np.float64(2.0),)],
             7: "int key"}
    clean = jsonable(value)
    assert clean == {"nan": None, "inf": None, "ninf": None, "np": None, "int": 3,
                     "nested": [1.5, [2.0]], "7": "int key"}
    assert type(clean["int"]) is int and type(clean["nested"][1][0]) is float
    json.dumps(clean, allow_nan=False)  # would raise on a NaN left behind


def test_the_trio_is_written(tmp_path):
    frame = pd.DataFrame({"dataset": ["a", "b", "c"], "score": [0.5, np.nan, np.inf],
                          "count": pd.array([1, None, 3], dtype="Int64")})
    out = tmp_path / "deep" / "dir"
    paths = write_report(frame, f"{out}/", "thing", "# hello\n",
                         extra={"run_id": "r", "x": float("nan"), "seeds": (0, 1)})
    assert paths == {"parquet": f"{out}/thing.parquet", "json": f"{out}/thing.json",
                     "markdown": f"{out}/thing.md"}
    pd.testing.assert_frame_equal(pd.read_parquet(paths["parquet"]), frame)
    text = (out / "thing.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert doc["extra"] == {"run_id": "r", "x": None, "seeds": [0, 1]}
    assert doc["records"] == [{"dataset": "a", "score": 0.5, "count": 1},
                              {"dataset": "b", "score": None, "count": None},
                              {"dataset": "c", "score": None, "count": 3}]
    assert (out / "thing.md").read_text() == "# hello\n"


def test_an_empty_frame_and_no_extra(tmp_path):
    paths = write_report(pd.DataFrame(columns=["a"]), str(tmp_path), "empty", "")
    with open(paths["json"]) as f:
        assert json.load(f) == {"extra": {}, "records": []}


def test_reports_go_through_fsspec():
    paths = write_report(pd.DataFrame({"a": [1]}), "memory://reports-test/x", "r", "md")
    assert paths["json"] == "memory://reports-test/x/r.json"
    with fsspec.open(paths["parquet"], "rb") as f:
        assert pd.read_parquet(f)["a"].tolist() == [1]
    with fsspec.open(paths["markdown"], "r") as f:
        assert f.read() == "md"
