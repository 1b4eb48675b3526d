"""pipeline.core.failures: which error rows are failed rows, the failed fraction and the
refusal marker (issue 22: the fraction counts every (query, seed, scorer) error row at any
stage except those that keep the row's scores)."""
from __future__ import annotations

import pytest

from pipeline.core.failures import (KEEPS_SCORES, FailureTally, check_fraction,
                                    counts_as_failed, read_refusal, write_refusal)


@pytest.mark.parametrize("record, failed", [
    ({"seed": 0, "stage": "score"}, True),
    ({"seed": 2, "stage": "extract"}, True),
    ({"seed": 0, "stage": "decode_image"}, True),
    ({"seed": 0, "stage": "read_manifest"}, True),  # a query row the manifest rejected
    ({"seed": 0, "stage": "read_mask"}, False),  # scored; only its pixel metrics are missing
    ({"seed": 0, "stage": "write_map"}, False),  # scored; only its map file is missing
    ({"seed": None, "stage": "decode_image"}, False),  # a reference: appears once, no seed
])
def test_which_error_rows_are_failed_rows(record, failed):
    assert counts_as_failed(record) is failed
    assert KEEPS_SCORES == {"read_mask", "write_map"}


def test_fraction_and_refusal_boundary():
    tally = FailureTally.of(95, {"ValueError: x": 4, "RuntimeError: y": 1})
    assert (tally.scored, tally.failed, tally.expected) == (95, 5, 100)
    assert tally.fraction == pytest.approx(0.05)
    assert not tally.refused(0.05)  # at the limit: commits
    assert tally.refused(0.049)
    assert tally.most_common_reason == "ValueError: x"
    assert FailureTally().fraction == 0.0 and not FailureTally().refused(0.0)  # nothing expected
    assert FailureTally.of(0, {"e": 3}).fraction == 1.0


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan"), float("inf")])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(ValueError, match="max_failed_fraction"):
        check_fraction(bad)


def test_refusal_marker_round_trips(tmp_path):
    output = str(tmp_path)
    assert read_refusal(output, "_staging/run_date=2024-01-01/k1") is None
    tally = FailureTally.of(1, {"boom": 9})
    write_refusal(output, "_staging/run_date=2024-01-01/k1", tally, 0.05)
    assert read_refusal(output, "_staging/run_date=2024-01-01/k1") == (tally, 0.05)
    assert read_refusal(output, "_staging/run_date=2024-01-01/k2") is None
