"""The six scorers that need no trained file of their own in one scoring job, and zero-shot scoring, on a small demo set.

Small random models keep it fast (tiny CLIP, random MobileNetV2, a random DINOv2 ViT-S on
56-pixel inputs): these runs check the job's wiring, not detection quality (the
real-weights test in tests/model/scorers does that).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.model.scorers import registry
from pipeline.run import run_score
from pipeline.runner import counter
from tests.beamtest import Run, pool_calibration, read_table


def scorer_names() -> tuple[str, ...]:
    """Every registered scorer but the trained ones (RegAD and CoOp need their checkpoints:
    tests/pipeline/test_trained_scorers_e2e.py scores them)."""
    return tuple(n for n in registry.scorer_names() if n not in ("regad", "coop"))

K = 2
SEEDS = (0, 1)
RUN_DATE = "2024-05-01"
MODELS = dict(cnn_backbone="mobilenet_v2", cnn_weights="random:0",
              vit_backbone="vit_small_patch14_dinov2", vit_weights="random:0",
              vit_image_size=56)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    root = tmp_path_factory.mktemp("demo")
    roots = generate_demo(str(root / "data"), image_size=32, n_train=3, n_test_good=2,
                          n_test_defect_per_type=1)
    frame = make_manifest(roots)
    path = str(root / "manifest.parquet")
    write_manifest(frame, path)
    return path, frame


def _run(manifest, output: str, **kw) -> Run:
    path, frame = manifest
    config = ScoreConfig(manifest=path, output=output, seeds=SEEDS, backbone=tiny_spec(),
                         run_date=RUN_DATE, run_id="six", batch_size=4, write_patch_map=True,
                         options=MODELS, **kw)
    result = run_score(config, beam_args=[])
    return Run(config, frame, result, read_table(output, SCORES), read_table(output, ERRORS))


@pytest.fixture(scope="module")
def six(manifest, tmp_path_factory) -> Run:
    return _run(manifest, str(tmp_path_factory.mktemp("six")), k=K, scorers=scorer_names())


@pytest.fixture(scope="module")
def zero_shot(manifest, tmp_path_factory) -> Run:
    return _run(manifest, str(tmp_path_factory.mktemp("zero")), k=0,
                scorers=("inctrl", "winclip"))


def _queries(run: Run) -> pd.DataFrame:
    return run.manifest[run.manifest.role == "query"]


def test_every_query_has_one_row_per_seed_and_scorer(six):
    assert six.errors.empty
    queries = _queries(six)
    assert len(six.scores) == len(queries) * len(SEEDS) * len(scorer_names())
    keys = six.scores.groupby(["dataset", "image_id", "seed", "scorer"]).size()
    assert (keys == 1).all()
    assert set(six.scores.scorer) == set(scorer_names())
    assert np.isfinite(six.scores.final_score).all()
    # one decode and one forward per extractor per image, whatever the number of scorers
    references = {(d, r) for d, ids in zip(six.scores.dataset, six.scores.reference_ids)
                  for r in ids}
    # Beside the queries ride the reference candidates not every seed drew (calibration).
    calibration = pool_calibration(six.manifest, SEEDS, K)
    assert counter(six.result, "images_loaded") == (len(queries) + len(references)
                                                    + len(calibration))
    assert counter(six.result, "num_inferences", "ExtractQueryFeatures") == (
        len(queries) + len(calibration))
    assert counter(six.result, "num_inferences", "ExtractReferenceFeatures") == len(references)


def test_rows_say_which_model_scored_them(six):
    by = six.scores.drop_duplicates("scorer").set_index("scorer")
    assert by.loc["patchcore", "backbone"] == "mobilenet_v2"
    assert by.loc["spade", "pretrained"] == "random:0"
    assert by.loc["anomalydino", "backbone"] == "vit_small_patch14_dinov2"
    assert by.loc["inctrl", "backbone"] == by.loc["winclip", "backbone"] == tiny_spec().name
    assert by.loc["inctrl", "heads_hash"] is not None
    assert pd.isna(by.loc["patchcore", "heads_hash"])
    # InCTRL's components are InCTRL's only
    assert six.scores.loc[six.scores.scorer == "inctrl", "fine_score"].notna().all()
    assert six.scores.loc[six.scores.scorer != "inctrl", "fine_score"].isna().all()


def test_each_scorer_keeps_its_patch_map_on_its_grid(six):
    for scorer, rows in six.scores.groupby("scorer"):
        h, w = rows.patch_map_height.iloc[0], rows.patch_map_width.iloc[0]
        assert (rows.patch_map_height == h).all() and (rows.patch_map_width == w).all()
        assert all(len(m) == h * w for m in rows.patch_map), scorer
    grids = six.scores.drop_duplicates("scorer").set_index("scorer")
    assert (grids.loc["patchcore", "patch_map_height"], grids.loc["spade",
            "patch_map_height"]) == (28, 56)  # strides 8 and 4 of a 224 input
    assert grids.loc["anomalydino", "patch_map_height"] == 4  # 56 / 14


def test_summary_and_comparison_hold_a_row_per_dataset_and_a_column_per_scorer(six):
    folder = summary_dir(six.config.output, RUN_DATE)
    summary = pd.read_parquet(f"{folder}/summary.parquet")
    comparison = pd.read_parquet(f"{folder}/comparison.parquet")
    datasets = sorted(_queries(six).dataset.unique())
    assert sorted(comparison.dataset) == datasets
    for scorer in scorer_names():
        for metric in ("auroc", "auprc"):
            assert f"{scorer}_{metric}_mean" in comparison.columns
            assert f"{scorer}_{metric}_std" in comparison.columns
    means = summary[summary.level == "dataset_mean"]
    assert sorted(means.groupby(["dataset", "scorer"]).size().index) == sorted(
        (d, s) for d in datasets for s in scorer_names())
    # the table's value is the per-seed mean over categories, then mean over seeds
    scores = six.scores
    for dataset in datasets:
        for scorer in ("patchcore", "inctrl"):
            rows = scores[(scores.dataset == dataset) & (scores.scorer == scorer)]
            per_seed = [np.mean([roc_auc_score(c.label, c.final_score)
                                 for _, c in g.groupby("category")])
                        for _, g in rows.groupby("seed")]
            got = comparison.set_index("dataset").loc[dataset, f"{scorer}_auroc_mean"]
            assert got == pytest.approx(np.mean(per_seed), abs=1e-12)
    markdown = open(f"{folder}/comparison.md").read()
    assert all(s in markdown for s in scorer_names()) and all(d in markdown for d in datasets)
    document = json.load(open(f"{folder}/comparison.json"))
    assert document["extra"]["scorers"] == list(scorer_names())


def test_zero_shot_scores_without_references(zero_shot):
    assert zero_shot.errors.empty
    scores = zero_shot.scores
    assert len(scores) == len(_queries(zero_shot)) * len(SEEDS) * 2
    assert set(scores.scoring_mode) == {"zero-shot"}
    assert (scores.k_used == 0).all() and (scores.reference_ids.map(len) == 0).all()
    inctrl = scores[scores.scorer == "inctrl"]
    # InCTRL zero-shot is its text prior alone, and has no patch map
    assert (inctrl.final_score == inctrl.text_prior_score).all()
    assert inctrl.patch_map.isna().all() and inctrl.fine_score.isna().all()
    winclip = scores[scores.scorer == "winclip"]
    assert winclip.patch_map.map(len).eq(64).all()
    # no references were drawn, loaded or extracted
    assert counter(zero_shot.result, "num_inferences", "ExtractReferenceFeatures") == 0
    assert os.path.isfile(f"{summary_dir(zero_shot.config.output, RUN_DATE)}/comparison.md")
