"""SelectCalibration and DecideAnomalies: which normal images calibrate which group, and each
query's decision from its own group's calibration scores (never an image's own reference)."""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core.config import ScoreConfig
from pipeline.core.schemas import ERRORS
from pipeline.core.selection import ALL_ROWS, RowSelection
from pipeline.model.scorers.suite import TensorBundle
from tests.beamtest import mrow, offline_pipeline
from transforms.decisions import (CALIBRATION_KEY, FROM_CALIBRATION, FROM_POOL,
                                  STAGE_SELECT_CALIBRATION, DecideAnomalies, SelectCalibration)
from transforms.references import ReferencePayload

ALPHA = 0.2  # 4 calibration scores reach it: n + 1 = 5 >= 1 / 0.2


def _config(**kw) -> ScoreConfig:
    return ScoreConfig(manifest="unused.parquet", output="unused", k=2, seeds=(0, 1),
                       false_alarm_rate=ALPHA, **kw)


def _rows() -> list:
    rows = [mrow(f"q{i}", role="query", category=c, label=i % 2) for c in ("a", "b")
            for i in range(2)]
    rows += [mrow(f"r{i}", category=c) for c in ("a", "b", "c") for i in range(3)]
    rows += [mrow("r-bad", category="a", label=1)]  # PrepareReferences refuses it
    rows += [mrow(f"k{i}", role="calibration", category=c, label=label)
             for c in ("a", "c") for i, label in enumerate((0, None))]
    rows += [mrow("k-anomalous", role="calibration", category="a", label=1)]
    rows += [mrow("k-late", role="calibration", category="b")]
    return rows


def _check_selected(config: ScoreConfig, selection: RowSelection = ALL_ROWS,
                    rows: list | None = None) -> None:
    rows = rows or _rows()
    with offline_pipeline() as p:
        manifest = p | beam.Create(rows)
        queries = manifest | beam.Filter(lambda r: r.role == "query")
        out = manifest | SelectCalibration(config, selection, queries)
        assert_that(out["rows"] | "Ids" >> beam.Map(
            lambda r: (r.category, r.image_id, dict(r.extra)[CALIBRATION_KEY])),
            equal_to(_want_rows(config, selection)), label="rows")
        assert_that(out[ERRORS] | "Errs" >> beam.Map(lambda e: (e.image_id, e.stage)),
                    equal_to([("k-anomalous", STAGE_SELECT_CALIBRATION)]), label="errors")


def _want_rows(config: ScoreConfig, selection: RowSelection) -> list:
    want = [("a", "k0", FROM_CALIBRATION), ("a", "k1", FROM_CALIBRATION)]
    if selection.references_until is None:
        want.append(("b", "k-late", FROM_CALIBRATION))
    if not config.representative:
        want += [(c, f"r{i}", FROM_POOL) for c in ("a", "b") for i in range(3)]
    return want


def test_calibration_rows_and_the_pool_of_groups_with_queries():
    # Group c has calibration rows and references but no query: nothing to calibrate.
    _check_selected(_config())


def test_representative_selection_calibrates_on_calibration_rows_only():
    _check_selected(_config(reference_selection="representative"))


def test_a_night_uses_the_calibration_rows_captured_by_its_date():
    rows = [dataclasses.replace(r, capture_date="2024-05-02") if r.image_id == "k-late" else r
            for r in _rows()]
    _check_selected(_config(), RowSelection(references_until="2024-05-01"), rows)


def test_a_candidate_every_seed_drew_calibrates_no_seed():
    # Group a: seed 0 drew r0, r1; seed 1 drew r0, r2. r0 is a reference of every seed.
    sets = [(("ds", "a", 0), ReferencePayload(("r0", "r1"), TensorBundle(), 2)),
            (("ds", "a", 1), ReferencePayload(("r0", "r2"), TensorBundle(), 2))]
    with offline_pipeline() as p:
        manifest = p | beam.Create(_rows())
        queries = manifest | beam.Filter(lambda r: r.role == "query")
        out = manifest | SelectCalibration(_config(), ALL_ROWS, queries,
                                           p | "Sets" >> beam.Create(sets))
        pool = (out["rows"]
                | beam.Filter(lambda r: dict(r.extra)[CALIBRATION_KEY] == FROM_POOL)
                | beam.Map(lambda r: (r.category, r.image_id)))
        assert_that(pool, equal_to([("a", "r1"), ("a", "r2"), ("b", "r0"), ("b", "r1"),
                                    ("b", "r2")]))


# ---------------------------------------------------------------- decisions


def _record(image_id: str, score: float, *, seed: int = 0, scorer: str = "patchcore",
            category: str = "a", calibration: str | None = None,
            references: tuple[str, ...] = ("r0", "r1")) -> dict:
    rec = {"dataset": "ds", "category": category, "image_id": image_id,
           "image_uri": f"/data/{image_id}.png", "seed": seed, "scorer": scorer,
           "final_score": score, "reference_ids": list(references),
           "reference_uris": [f"/data/{r}.png" for r in references]}
    if calibration:
        rec[CALIBRATION_KEY] = calibration
    return rec


def _expected_p(calibration: list[float], score: float) -> float:
    return (1 + sum(c >= score for c in calibration)) / (len(calibration) + 1)


def test_each_query_is_decided_by_its_own_groups_calibration(test_pipeline):
    calib_a0 = [0.1, 0.2, 0.3, 0.4]               # seed 0, patchcore: reaches alpha
    records = [_record(f"k{i}", s, calibration=FROM_CALIBRATION) for i, s in enumerate(calib_a0)]
    # The pool image r2 was not drawn by seed 0 (a calibration score) but seed 1 drew it.
    records.append(_record("r2", 0.35, calibration=FROM_POOL))
    records.append(_record("r2", 9.0, seed=1, calibration=FROM_POOL, references=("r2", "r0")))
    # Seed 1 has k0..k2 only: 3 scores, n + 1 < 1 / alpha.
    records += [_record(f"k{i}", s, seed=1, calibration=FROM_CALIBRATION)
                for i, s in enumerate((0.5, 0.6, 0.7))]
    # Another scorer of the same group and seed: a scale of its own.
    records += [_record(f"k{i}", 10 * s, scorer="spade", calibration=FROM_CALIBRATION)
                for i, s in enumerate(calib_a0)]
    queries = [_record("q0", 0.45), _record("q1", 0.25), _record("q0", 0.45, scorer="spade"),
               _record("q0", 0.45, seed=1), _record("qb", 0.5, category="b")]
    calib = calib_a0 + [0.35]  # with the pool image r2

    def check(out):
        got = {(r["image_id"], r["seed"], r["scorer"], r["category"]): r for r in out}
        assert len(out) == len(queries) == len(got)  # calibration records are consumed
        q0 = got[("q0", 0, "patchcore", "a")]
        assert q0["anomaly_p_value"] == _expected_p(calib, 0.45) == 1 / 6
        assert q0["calibration_size"] == 5 and q0["is_anomalous"] is True
        assert q0["decision_threshold"] == 0.4 and q0["false_alarm_rate"] == ALPHA
        q1 = got[("q1", 0, "patchcore", "a")]
        assert q1["anomaly_p_value"] == _expected_p(calib, 0.25) and q1["is_anomalous"] is False
        spade = got[("q0", 0, "spade", "a")]
        assert spade["anomaly_p_value"] == 1.0 and spade["is_anomalous"] is False
        short = got[("q0", 1, "patchcore", "a")]  # r2 is seed 1's reference: left out
        assert short["calibration_size"] == 3 and short["is_anomalous"] is None
        assert short["anomaly_p_value"] == _expected_p([0.5, 0.6, 0.7], 0.45) == 1.0
        assert short["decision_threshold"] is None
        none = got[("qb", 0, "patchcore", "b")]
        assert none["calibration_size"] == 0 and none["anomaly_p_value"] is None
        assert none["is_anomalous"] is None
        assert all(r["pixel_decision_threshold"] is None for r in out)  # no maps here

    with test_pipeline() as p:
        out = (p | beam.Create(records + queries)
               | DecideAnomalies(_config(scorers=("patchcore", "spade"))))
        assert_that(out, check)


def test_an_image_listed_twice_calibrates_once(test_pipeline):
    records = [_record(f"k{i}", float(i), calibration=FROM_CALIBRATION) for i in range(4)]
    records.append(_record("k3", 3.0, calibration=FROM_POOL))  # also a reference candidate

    def check(out):
        assert [r["calibration_size"] for r in out] == [4]

    with test_pipeline() as p:
        out = p | beam.Create(records + [_record("q", 1.5)]) | DecideAnomalies(_config())
        assert_that(out, check)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5])
def test_a_false_alarm_rate_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="false-alarm rate"):
        ScoreConfig(manifest="m", output="o", false_alarm_rate=bad)
