"""Calibrated decisions end to end on the demo set: calibration images ride the query path,
every query gets a decision, a query identical to a reference is never flagged by PatchCore,
flagged queries get defect masks, and too small a calibration set gives null decisions and
says how many images are missing.

Tiny demo images and a random MobileNetV2 keep it fast: the runs check the wiring and the
decision rule, not detection quality (bench/decisions.py measures that on real weights).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.calibration import min_calibration_size
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import MAPS, current_files, summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from tests.beamtest import Run, counter, read_table

N_TRAIN = 3
K = N_TRAIN  # every reference is drawn by every seed: a copy of one is a copy of a reference
SEEDS = (0, 1)
CALIBRATION = 4
ALPHA = 0.2  # 4 calibration images reach it (n + 1 >= 1 / alpha)
RUN_DATE = "2024-07-01"


def _config(manifest: str, output: str, **kw) -> ScoreConfig:
    return ScoreConfig(manifest=manifest, output=output, k=K, seeds=SEEDS, backbone=tiny_spec(),
                       run_date=RUN_DATE, run_id="decisions", batch_size=4,
                       scorers=("patchcore",), write_anomaly_maps=True,
                       options=dict(cnn_backbone="mobilenet_v2", cnn_weights="random:0"), **kw)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    """The demo set with calibration images, plus a query copy of every reference."""
    root = tmp_path_factory.mktemp("decisions")
    frame = make_manifest(generate_demo(str(root / "data"), image_size=32, n_train=N_TRAIN,
                                        n_test_good=2, n_test_defect_per_type=1,
                                        n_calibration=CALIBRATION))
    copies = frame[frame["role"] == "reference"].copy()
    (root / "copies").mkdir()
    paths = []
    for i, uri in enumerate(copies["image_uri"]):
        paths.append(str(root / "copies" / f"{i}.png"))
        shutil.copyfile(uri, paths[-1])
    copies = copies.assign(role="query", image_uri=paths, label=0,
                           image_id=[f"copy-of-{r}" for r in copies["image_id"]])
    return pd.concat([frame, copies], ignore_index=True)


def _run(frame: pd.DataFrame, folder: Path, **kw) -> Run:
    path = str(folder / "manifest.parquet")
    write_manifest(frame, path)
    config = _config(path, str(folder / "out"), **kw)
    result = run_score(config, beam_args=[])
    return Run(config, frame, result, read_table(config.output, SCORES),
               read_table(config.output, ERRORS))


@pytest.fixture(scope="module")
def calibrated(manifest, tmp_path_factory) -> Run:
    return _run(manifest, tmp_path_factory.mktemp("calibrated"), false_alarm_rate=ALPHA)


@pytest.fixture(scope="module")
def short(manifest, tmp_path_factory):
    """One calibration image per category and the default rate 0.05 (19 needed)."""
    calibration = manifest[manifest["role"] == "calibration"]
    keep = calibration.groupby(["dataset", "category"]).head(1).index
    frame = manifest[(manifest["role"] != "calibration") | manifest.index.isin(keep)]
    handler = _Collect()
    logging.getLogger().addHandler(handler)
    try:
        run = _run(frame.reset_index(drop=True), tmp_path_factory.mktemp("short"))
    finally:
        logging.getLogger().removeHandler(handler)
    return run, handler.messages


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _queries(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["role"] == "query"]


def test_calibration_images_are_scored_but_are_not_queries(calibrated):
    queries = _queries(calibrated.manifest)
    assert calibrated.errors.empty
    # Every query once per seed and scorer; no calibration image among the rows.
    assert len(calibrated.scores) == len(queries) * len(SEEDS)
    assert set(calibrated.scores["image_id"]) == set(queries["image_id"])
    result = calibrated.result
    assert counter(result, "queries_selected") == len(queries)
    assert counter(result, "queries_scored") == len(queries) * len(SEEDS)
    n_calibration = int((calibrated.manifest["role"] == "calibration").sum())
    # k = every reference: the pool leaves none, the calibration rows are scored per seed.
    assert counter(result, "calibration_scores") == n_calibration * len(SEEDS)
    summary = pd.read_parquet(f"{summary_dir(calibrated.config.output, RUN_DATE)}/"
                              "summary.parquet")
    rows = summary[summary["level"] == "category"]
    assert (rows["query_count"] == queries.groupby("category").size()
            .reindex(rows["category"]).to_numpy()).all()
    assert (rows["calibration_size"] == CALIBRATION).all()


def test_every_query_gets_a_decision_by_the_conformal_rule(calibrated):
    s = calibrated.scores
    assert s["is_anomalous"].notna().all() and (s["calibration_size"] == CALIBRATION).all()
    assert (s["false_alarm_rate"] == ALPHA).all()
    n = CALIBRATION
    ranks = s["anomaly_p_value"] * (n + 1)
    assert np.allclose(ranks, np.round(ranks)) and ranks.between(1, n + 1).all()
    flagged = s["is_anomalous"].astype(bool)
    assert (flagged == (s["anomaly_p_value"] <= ALPHA)).all()
    assert (flagged == (s["final_score"] > s["decision_threshold"])).all()
    per_group = s.groupby(["dataset", "category", "seed"])["decision_threshold"].nunique()
    assert (per_group == 1).all()


def test_patchcore_never_flags_a_query_identical_to_a_reference(calibrated):
    s = calibrated.scores
    copies = s[s["image_id"].str.startswith("copy-of-")]
    assert len(copies) == int((calibrated.manifest["role"] == "reference").sum()) * len(SEEDS)
    # Its own patches are in the memory bank: a score of (about) zero, below every
    # calibration image's.
    assert not copies["is_anomalous"].astype(bool).any()
    assert (copies["anomaly_p_value"] == 1.0).all()
    assert (copies["final_score"] < copies["decision_threshold"]).all()


def test_flagged_queries_get_committed_binary_defect_masks(calibrated):
    s = calibrated.scores
    flagged = s[s["is_anomalous"].astype(bool)]
    assert len(flagged) > 0 and flagged["defect_mask_uri"].notna().all()
    assert s.loc[~s["is_anomalous"].astype(bool), "defect_mask_uri"].isna().all()
    in_force = set(current_files(calibrated.config.output, MAPS, RUN_DATE))
    for row in flagged.to_dict("records"):
        assert row["defect_mask_uri"] in in_force
        with Image.open(row["defect_mask_uri"]) as mask, Image.open(row["image_uri"]) as image:
            values = np.asarray(mask)
            assert mask.mode == "L" and mask.size == image.size
        assert set(np.unique(values)) <= {0, 255}
        assert row["defect_area_fraction"] == pytest.approx((values > 0).mean())
        assert row["pixel_decision_threshold"] is not None
        # The mask is the map strictly above the pixel threshold: a map never exceeds its
        # maximum, so an empty mask means a map maximum at or below the threshold.
        if row["defect_area_fraction"] > 0:
            assert row["map_max"] > row["pixel_decision_threshold"]
            assert row["defect_regions"] >= 1
        else:
            assert row["map_max"] <= row["pixel_decision_threshold"] * (1 + 1e-6)
            assert row["defect_regions"] == 0


def test_too_small_a_calibration_set_gives_null_decisions_and_says_so(short):
    run, messages = short
    s = run.scores
    assert s["is_anomalous"].isna().all() and s["decision_threshold"].isna().all()
    assert (s["calibration_size"] == 1).all() and (s["anomaly_p_value"] > 0).all()
    assert s["defect_mask_uri"].isna().all()
    need = min_calibration_size(0.05)
    summary = pd.read_parquet(f"{summary_dir(run.config.output, RUN_DATE)}/summary.parquet")
    notes = summary.loc[summary["level"] == "category", "decision_note"]
    assert notes.str.contains(f"at least {need} normal images needed, {need - 1} more").all()
    warning = next(m for m in messages if m.startswith("No decisions at false-alarm rate"))
    assert f"needs {need - 1} more" in warning and f"at least {need}" in warning
    with open(f"{summary_dir(run.config.output, RUN_DATE)}/summary.md") as f:
        assert "Rows without a decision:" in f.read()


def test_query_scores_do_not_depend_on_the_calibration_images_beside_them(calibrated, short):
    run, _ = short
    key = ["dataset", "image_id", "seed", "scorer"]
    a = calibrated.scores.sort_values(key).reset_index(drop=True)
    b = run.scores.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key], b[key])
    assert (a["final_score"].to_numpy() == b["final_score"].to_numpy()).all()
