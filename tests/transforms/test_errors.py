"""error_records: every failure becomes rows that reconcile each query once per seed and scorer."""
from __future__ import annotations

import pytest

from pipeline.core.manifest import RowError, normalize_row
from tests.beamtest import mrow
from transforms.errors import error_records, row_error

SEEDS = (0, 3, 5)
SCORERS = {"inctrl": "model-inctrl", "patchcore": "model-patchcore"}


def _error(role: str | None) -> RowError:
    return RowError(image_uri="/d/a.png", dataset="ds", category="cat", image_id="a", role=role,
                    stage="read_image", reason="file not found")


def test_query_errors_fan_out_once_per_seed_and_scorer():
    records = error_records(_error("query"), SEEDS, SCORERS, "run-1")
    assert [(r["seed"], r["scorer"]) for r in records] == [
        (s, name) for s in SEEDS for name in SCORERS]
    for r in records:  # each row names the model of its own scorer
        assert (r["image_id"], r["stage"], r["reason"], r["run_id"], r["model_id"]) == (
            "a", "read_image", "file not found", "run-1", f"model-{r['scorer']}")


@pytest.mark.parametrize("role", ["reference", "train", None])
def test_other_errors_give_one_row_without_seed(role):
    records = error_records(_error(role), SEEDS, SCORERS, "run-1")
    assert [(r["role"], r["seed"], r["scorer"], r["model_id"]) for r in records] == [
        (role, None, None, None)]


def test_pinned_seed_gives_one_row_for_that_seed():
    records = error_records(_error("query"), SEEDS, SCORERS, "run-1", seed=3)
    assert [(r["seed"], r["scorer"]) for r in records] == [(3, "inctrl"), (3, "patchcore")]
    records = error_records(_error("query"), SEEDS, SCORERS, "run-1", seed=3,
                            scorer="patchcore")
    assert [(r["seed"], r["scorer"]) for r in records] == [(3, "patchcore")]


def test_rejected_query_row_with_role_as_written_fans_out():
    # The role of a rejected row is kept as written; a valid "Query" row is scored per seed,
    # so its rejection must also appear once per seed.
    error = normalize_row({"image_uri": "/d/a.png", "dataset": "ds", "role": " Query ",
                           "label": 7})
    assert isinstance(error, RowError)
    assert len(error_records(error, SEEDS, SCORERS, "r")) == len(SEEDS) * len(SCORERS)


def test_row_error_keeps_the_row_identity():
    row = mrow("a", role="query")
    error = row_error(row, "score", "no references")
    assert (error.image_uri, error.dataset, error.category, error.image_id, error.role) == (
        row.image_uri, row.dataset, row.category, row.image_id, row.role)
    assert (error.stage, error.reason) == ("score", "no references")
