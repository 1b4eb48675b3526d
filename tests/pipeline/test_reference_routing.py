"""Reference features reach the scoring workers through the feature cache, never as a
side input of tensors (issue 22): a run without --feature-cache extracts into a cache of
its own and removes it with its staging; a second run with an unchanged --feature-cache does
no reference forward for any extractor, and scores the same; every reference set is a few
ids and content hashes."""
from __future__ import annotations

import glob

import pandas as pd
import pytest

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from pipeline.runner import counter, distribution_max

DATE = "2024-04-02"
SCORERS = ("inctrl", "patchcore")  # two extractors: the tiny CLIP and a CNN
CNN = {"cnn_backbone": "resnet18", "cnn_weights": "random:0"}
KEY = ["image_id", "seed", "scorer"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("demo")
    path = str(root / "manifest.parquet")
    pairs = generate_demo(str(root / "data"), seed=1, n_train=3, n_test_good=1,
                          n_test_defect_per_type=1)
    write_manifest(make_manifest(pairs).drop(columns=["mask_uri"]), path)
    return path


def _config(manifest: str, output: str, run_id: str, cache: str | None) -> ScoreConfig:
    return ScoreConfig(manifest=manifest, output=output, k=2, seeds=(0, 1), backbone=tiny_spec(),
                       scorers=SCORERS, options=CNN, run_date=DATE, run_id=run_id,
                       batch_size=4, feature_cache=cache)


def _scores(output: str) -> pd.DataFrame:
    files = glob.glob(f"{output}/scores/**/*.parquet", recursive=True)
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return frame.sort_values(KEY).reset_index(drop=True)


def _distinct_references(scores: pd.DataFrame) -> int:
    return len({i for ids in scores["reference_ids"] for i in ids})


def test_a_second_run_on_an_unchanged_cache_does_no_reference_forward(manifest, tmp_path):
    cache = str(tmp_path / "cache")
    first = run_score(_config(manifest, str(tmp_path / "a"), "first", cache), [])
    second = run_score(_config(manifest, str(tmp_path / "b"), "second", cache), [])
    a, b = _scores(str(tmp_path / "a")), _scores(str(tmp_path / "b"))
    refs = _distinct_references(a)
    assert refs > 0
    # one forward per distinct reference image (both extractors in one forward step), then none
    assert counter(first, "num_inferences", "ExtractReferenceFeatures") == refs
    assert counter(second, "num_inferences", "ExtractReferenceFeatures") == 0
    assert counter(second, "feature_cache_hits") == refs
    queries = len(a) // (2 * len(SCORERS))
    # the calibration images (issue 23: the candidates no seed drew) ride with the queries
    calibration = counter(second, "calibration_images_selected")
    assert calibration > 0
    assert counter(second, "num_inferences", "ExtractQueryFeatures") == queries + calibration
    # the features read back from the cache give the very same scores, for both extractors
    pd.testing.assert_series_equal(a["final_score"], b["final_score"])
    assert set(a["scorer"]) == set(SCORERS)


def test_without_a_cache_the_run_uses_its_own_and_leaves_nothing(manifest, tmp_path):
    output = str(tmp_path / "out")
    result = run_score(_config(manifest, output, "private", None), [])
    scores = _scores(output)
    assert len(scores) > 0 and scores["final_score"].notna().all()
    assert counter(result, "num_inferences", "ExtractReferenceFeatures") == \
        _distinct_references(scores)
    # the run's private cache lived in its staging folder, gone with the commit
    assert not glob.glob(f"{output}/_staging/**/*.safetensors", recursive=True)
    assert not glob.glob(f"{output}/**/*.safetensors", recursive=True)
    held = distribution_max(result, "reference_sets_held")
    groups = scores.groupby(["category", "seed"]).ngroups
    assert 1 <= held <= groups
