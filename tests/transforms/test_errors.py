"""error_records: every failure becomes rows that reconcile each query once per seed."""
from __future__ import annotations

import pytest

from pipeline.core.manifest import RowError, normalize_row
from tests.beamtest import mrow
from transforms.errors import error_records, row_error

SEEDS = (0, 3, 5)


def _error(role: str | None) -> RowError:
    return RowError(image_uri="/d/a.png", dataset="ds", category="cat", image_id="a", role=role,
                    stage="read_image", reason="file not found")


def test_query_errors_fan_out_once_per_seed():
    records = error_records(_error("query"), SEEDS, "run-1", "model-1")
    assert [r["seed"] for r in records] == list(SEEDS)
    for r in records:
        assert (r["image_id"], r["stage"], r["reason"], r["run_id"], r["model_id"]) == (
            "a", "read_image", "file not found", "run-1", "model-1")


@pytest.mark.parametrize("role", ["reference", "train", None])
def test_other_errors_give_one_row_without_seed(role):
    records = error_records(_error(role), SEEDS, "run-1", "model-1")
    assert [(r["role"], r["seed"]) for r in records] == [(role, None)]


def test_pinned_seed_gives_one_row_for_that_seed():
    records = error_records(_error("query"), SEEDS, "run-1", "model-1", seed=3)
    assert [r["seed"] for r in records] == [3]


def test_rejected_query_row_with_role_as_written_fans_out():
    # The role of a rejected row is kept as written; a valid "Query" row is scored per seed,
    # so its rejection must also appear once per seed.
    error = normalize_row({"image_uri": "/d/a.png", "dataset": "ds", "role": " Query ",
                           "label": 7})
    assert isinstance(error, RowError)
    assert [r["seed"] for r in error_records(error, SEEDS, "r", "m")] == list(SEEDS)


def test_row_error_keeps_the_row_identity():
    row = mrow("a", role="query")
    error = row_error(row, "score", "no references")
    assert (error.image_uri, error.dataset, error.category, error.image_id, error.role) == (
        row.image_uri, row.dataset, row.category, row.image_id, row.role)
    assert (error.stage, error.reason) == ("score", "no references")
