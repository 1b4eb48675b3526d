"""RowSelection: which queries a run scores and which references it may draw."""
from __future__ import annotations

import pickle

import pytest

from pipeline.core.manifest import ManifestRow
from pipeline.core.selection import ALL_ROWS, RowSelection


def mrow(image_id: str, role: str, capture_date: str | None) -> ManifestRow:
    return ManifestRow(image_uri=f"/d/{image_id}.png", dataset="ds", category="c", role=role,
                       label=0, image_id=image_id, defect_type=None, capture_date=capture_date)


def test_queries_are_that_dates_not_yet_scored():
    night = RowSelection(query_date="2024-01-02", skip=frozenset({("ds", "done")}))
    assert night.is_query(mrow("q", "query", "2024-01-02"))
    assert not night.is_query(mrow("done", "query", "2024-01-02"))
    other = ManifestRow(image_uri="/d/done.png", dataset="other-line", category="c", role="query",
                        label=0, image_id="done", defect_type=None, capture_date="2024-01-02")
    assert night.is_query(other)  # the same image, queried in another dataset: not done
    assert not night.is_query(mrow("q", "query", "2024-01-03"))
    assert not night.is_query(mrow("q", "query", None))
    assert not night.is_query(mrow("q", "reference", "2024-01-02"))


def test_references_are_undated_or_captured_by_the_date():
    night = RowSelection(references_until="2024-01-02")
    assert night.is_candidate(mrow("r", "reference", None))
    assert night.is_candidate(mrow("r", "reference", "2024-01-02"))
    assert night.is_candidate(mrow("r", "reference", "2023-12-31"))
    assert not night.is_candidate(mrow("r", "reference", "2024-01-03"))
    # Only references are narrowed: queries reach the reference draw whatever their date.
    assert night.is_candidate(mrow("q", "query", "2024-01-03"))


@pytest.mark.parametrize("row", [mrow("q", "query", None), mrow("q", "query", "2030-01-01"),
                                 mrow("r", "reference", "2030-01-01")])
def test_all_rows_selects_every_query_and_candidate(row):
    assert ALL_ROWS.is_query(row) == (row.role == "query")
    assert ALL_ROWS.is_candidate(row)
    assert ALL_ROWS.carried_scores is None


def test_selection_travels_to_workers():
    night = RowSelection("2024-01-02", frozenset({"a"}), "2024-01-02", "out/carried.parquet")
    assert pickle.loads(pickle.dumps(night)) == night
    assert pickle.loads(pickle.dumps(night.is_query))(mrow("b", "query", "2024-01-02"))


def test_calibration_images_are_undated_or_captured_by_the_date():
    night = RowSelection(references_until="2024-01-02")
    assert night.is_calibration(mrow("c", "calibration", "2024-01-02"))
    assert night.is_calibration(mrow("c", "calibration", None))
    assert not night.is_calibration(mrow("c", "calibration", "2024-01-03"))
    assert not night.is_calibration(mrow("c", "reference", "2024-01-01"))
    assert ALL_ROWS.is_calibration(mrow("c", "calibration", "2099-01-01"))
