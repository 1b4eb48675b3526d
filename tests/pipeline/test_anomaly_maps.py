"""--write-anomaly-maps and pixel metrics, end to end on a small demo set with masks."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.anomaly_images import decode_map_png
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import current_files, current_record, summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from tests.beamtest import Run, read_table
from transforms.maps import MAPS, STAGE_MASK

RUN_DATE = "2024-06-01"
SCORERS = ("inctrl", "patchcore")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("maps")
    roots = generate_demo(str(root / "data"), image_size=48, n_train=3, n_test_good=2,
                          n_test_defect_per_type=1)
    frame = make_manifest(roots)
    # one mask that cannot be read: an error row for pixel metrics, not a failed query
    broken = frame.index[frame.mask_uri.notna()][0]
    frame.loc[broken, "mask_uri"] = str(root / "missing_mask.png")
    path = str(root / "manifest.parquet")
    write_manifest(frame, path)
    output = str(root / "out")
    config = ScoreConfig(manifest=path, output=output, k=2, seeds=(0, 1), backbone=tiny_spec(),
                         run_date=RUN_DATE, run_id="maps", batch_size=4, scorers=SCORERS,
                         options=dict(cnn_backbone="mobilenet_v2", cnn_weights="random:0"),
                         write_anomaly_maps=True)
    result = run_score(config, [])
    return Run(config, frame, result, read_table(output, SCORES), read_table(output, ERRORS))


def test_every_row_points_at_its_committed_map_and_overlay(run):
    scores = run.scores
    assert scores.anomaly_map_uri.notna().all() and scores.overlay_uri.notna().all()
    committed = {os.path.abspath(p) for p in current_files(run.config.output, MAPS)}
    # Written once, in place, under the run's own folder (one per dataset and bundle attempt).
    key = current_record(run.config.output, RUN_DATE).commit_id
    assert committed == {os.path.abspath(u) for u in scores.anomaly_map_uri} | {
        os.path.abspath(u) for u in scores.overlay_uri}
    for rec in scores.itertuples():
        assert (f"/{MAPS}/run_date={RUN_DATE}/run={key}/dataset={rec.dataset}/"
                in rec.anomaly_map_uri)
        assert os.path.abspath(rec.anomaly_map_uri) in committed
        image = Image.open(rec.image_uri)
        overlay = Image.open(rec.overlay_uri)
        assert overlay.size == image.size and overlay.mode == "RGB"
        with open(rec.anomaly_map_uri, "rb") as f:
            amap = decode_map_png(f.read(), rec.map_min, rec.map_max)
        assert amap.shape == (image.height, image.width)
        assert amap.min() == pytest.approx(rec.map_min) and amap.max() == pytest.approx(
            rec.map_max, rel=1e-4, abs=1e-6)
    assert len(set(scores.anomaly_map_uri)) == len(scores)  # one per (query, seed, scorer)
    assert not os.path.exists(f"{run.config.output}/_staging/run_date={RUN_DATE}/maps")


def test_the_map_is_hot_where_the_defect_is(run):
    # PatchCore's map on a random CNN still sees a planted square: more of the map's mass
    # lies inside the mask than its share of the image, for most defect images.
    rows = run.scores[(run.scores.scorer == "patchcore") & run.scores.label.eq(1)]
    masks = run.manifest.set_index("image_id").mask_uri
    inside = []
    for rec in rows.itertuples():
        if not isinstance(masks.get(rec.image_id), str) or not os.path.exists(
                masks[rec.image_id]):
            continue
        mask = np.asarray(Image.open(masks[rec.image_id])) > 0
        with open(rec.anomaly_map_uri, "rb") as f:
            amap = decode_map_png(f.read(), rec.map_min, rec.map_max)
        inside.append(amap[mask].mean() > amap[~mask].mean())
    assert len(inside) >= 4 and np.mean(inside) > 0.5


def test_pixel_metrics_per_scorer_and_a_bad_mask_is_one_error_row(run):
    folder = summary_dir(run.config.output, RUN_DATE)
    summary = pd.read_parquet(f"{folder}/summary.parquet")
    means = summary[summary.level == "dataset_mean"]
    assert set(means.scorer) == set(SCORERS)
    assert means.pixel_auroc_mean.between(0, 1).all() and means.aupro_mean.between(0, 1).all()
    mask_errors = run.errors[run.errors.stage == STAGE_MASK]
    assert len(mask_errors) == 2 * len(SCORERS)  # the broken mask, per seed and scorer
    assert mask_errors.reason.str.contains("mask").all()
    # the query still has its scores
    broken = mask_errors.image_id.iloc[0]
    assert len(run.scores[run.scores.image_id == broken]) == 2 * len(SCORERS)
    comparison = pq.read_table(f"{folder}/comparison.parquet").to_pandas()
    assert {"inctrl_pixel_auroc_mean", "patchcore_aupro_mean"} <= set(comparison.columns)
