"""--reference-selection representative, end to end: deterministic, cached, per scorer."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.model.scorers.references import choose_representative
from pipeline.model.scorers.suite import TensorBundle, get_feature_suite, suite_preprocess
from pipeline.run import run_score
from pipeline.runner import counter
from tests.beamtest import read_table

K = 2
SCORERS = ("inctrl", "patchcore")
MODELS = dict(cnn_backbone="mobilenet_v2", cnn_weights="random:0")


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("rep")
    roots = generate_demo(str(root / "data"), image_size=32, n_train=5, n_test_good=2,
                          n_test_defect_per_type=1)
    return make_manifest(roots)


def _run(frame: pd.DataFrame, root, name: str, **kw):
    path = str(root / f"{name}.parquet")
    write_manifest(frame, path)
    config = ScoreConfig(manifest=path, output=str(root / name), k=K, seeds=(0, 1),
                         backbone=tiny_spec(), run_date="2024-07-01", run_id=name,
                         batch_size=4, scorers=SCORERS, reference_selection="representative",
                         options=MODELS, **kw)
    result = run_score(config, [])
    return config, result, read_table(config.output, SCORES)


@pytest.fixture(scope="module")
def runs(frame, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = str(root / "cache")
    first = _run(frame, root, "first", feature_cache=cache)
    shuffled = frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    second = _run(shuffled, root, "second", feature_cache=cache)
    return first, second


def _refs(scores: pd.DataFrame) -> dict:
    return {(r.dataset, r.category, r.seed, r.scorer): tuple(r.reference_ids)
            for r in scores.itertuples()}


def test_the_same_pool_gives_the_same_references_in_any_input_order(runs):
    (_, _, first), (_, _, second) = runs
    assert _refs(first) == _refs(second)
    assert (first.reference_selection == "representative").all()
    # the whole pool: every seed chooses the same k
    for (d, c, seed, s), ids in _refs(first).items():
        assert ids == _refs(first)[(d, c, 0, s)] and len(ids) == K


def test_the_choice_is_k_medoids_of_each_scorers_own_features(runs, frame):
    (config, _, scores), _ = runs
    suite = config.suite
    preprocess = suite_preprocess(suite)
    group = frame[(frame.role == "reference")].groupby(["dataset", "category"])
    (dataset, category), pool = next(iter(group))
    pool = sorted(pool.itertuples(), key=lambda r: (r.image_id, r.image_uri))  # the job's order
    from PIL import Image
    views = [preprocess(Image.open(r.image_uri).convert("RGB")) for r in pool]
    feats = get_feature_suite(suite).extract(
        {v: TensorBundle.cat([TensorBundle({v: x[v][None]}) for x in views])[v]
         for v in suite.views})
    rows = scores[(scores.dataset == dataset) & (scores.category == category)
                  & (scores.seed == 0)]
    for scorer, ext in (("inctrl", "clip"), ("patchcore", "cnn")):
        expected = [pool[i].image_id for i in choose_representative(ext, feats.part(ext), K)]
        got = rows[rows.scorer == scorer].reference_ids.iloc[0]
        assert list(got) == expected, scorer


def test_a_known_pool_loads_only_the_chosen_images(runs):
    (_, first, _), (_, second, _) = runs
    assert counter(first, "reference_choices_computed") > 0
    assert counter(first, "reference_choices_from_cache") == 0
    assert counter(second, "reference_choices_computed") == 0
    assert counter(second, "reference_choices_from_cache") == counter(
        first, "reference_choices_computed")
    assert counter(second, "num_inferences", "ExtractReferenceFeatures") < counter(
        first, "num_inferences", "ExtractReferenceFeatures")


def test_a_pool_of_k_is_the_whole_pool(frame, tmp_path):
    _, _, scores = _run(frame, tmp_path, "limited", reference_pool_limit=K)
    assert (scores.k_used == K).all()
    for rec in scores.itertuples():
        pool = frame[(frame.dataset == rec.dataset) & (frame.category == rec.category)
                     & (frame.role == "reference")]
        from pipeline.core.manifest import normalize_row
        from pipeline.core.sampling import draw_references
        rows = [normalize_row(r) for r in pool.to_dict("records")]
        drawn = {r.image_id for r in draw_references(rows, rec.seed, K)}
        assert set(rec.reference_ids) == drawn  # the sampled pool of k, all of it
