"""The job in bf16 on the CPU (``--precision bf16``: every extractor's weights and input in
bf16) against fp32: dtype at the edges, scores close and ranked alike, the feature cache's
identity, the rows' model ids and the summary's record of the precision.

A CPU without native bf16 refuses bf16 (``tests/model/test_precision.py``), so these tests
need one. Tolerances are bf16's: 8 bits of mantissa through a few blocks.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from pipeline.core.feature_cache import FeatureCache
from pipeline.core.schemas import SUMMARY
from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.precision import cpu_bf16
from tests.beamtest import SCORE_KEY, counter, score_small, small_demo_manifest

pytestmark = pytest.mark.skipif(not cpu_bf16().native,
                                reason="this CPU has no native bf16 (the job refuses it)")

RUN_DATE = "2024-05-06"
KEY = SCORE_KEY
SCORERS = ("inctrl", "patchcore")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    backbone = get_backbone(tiny_spec())
    g = torch.Generator().manual_seed(0)
    height, width = backbone.geometry.image_size
    return torch.rand(6, 3, height, width, generator=g) * 2 - 1


def test_bf16_features_are_float32_and_close_to_fp32(pixels):
    fp32 = get_backbone(tiny_spec()).encode_images(pixels)
    bf16_backbone = get_backbone(tiny_spec(precision="bf16"))
    bf16 = bf16_backbone.encode_images(pixels)
    assert bf16.tokens.dtype == torch.float32 and bf16.embeds.dtype == torch.float32
    assert bf16.tokens.shape == fp32.tokens.shape and bf16.embeds.shape == fp32.embeds.shape
    # bf16 really ran: not bit-identical to fp32 ...
    assert not torch.equal(bf16.tokens, fp32.tokens)
    # ... but every patch token points the same way.
    cos = F.cosine_similarity(bf16.tokens, fp32.tokens, dim=-1)
    assert cos.min() > 0.99
    assert F.cosine_similarity(bf16.embeds, fp32.embeds, dim=-1).min() > 0.99


def test_text_features_are_float32_whatever_the_precision():
    """Prompts are encoded once per category: in fp32 even when images go through bf16."""
    texts = ["a photo of a flawless widget.", "a photo of a damaged widget."]
    fp32 = get_backbone(tiny_spec()).encode_texts(texts)
    bf16 = get_backbone(tiny_spec(precision="bf16")).encode_texts(texts)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.norm(dim=-1), torch.ones(2))
    assert torch.equal(bf16, fp32)


def test_feature_cache_keeps_precisions_apart(tmp_path, pixels):
    """An fp32 cache entry must never be served to a bf16 run (or back)."""
    fp32_spec, bf16_spec = tiny_spec(), tiny_spec(precision="bf16")
    assert fp32_spec.feature_id != bf16_spec.feature_id
    features = get_backbone(fp32_spec).encode_images(pixels[:1])
    FeatureCache(str(tmp_path), fp32_spec).put(
        "ab" * 32, {"tokens": features.tokens, "embeds": features.embeds})
    assert FeatureCache(str(tmp_path), fp32_spec).get("ab" * 32) is not None
    assert FeatureCache(str(tmp_path), bf16_spec).get("ab" * 32) is None


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return small_demo_manifest(tmp_path_factory.mktemp("precision"))


def _run(manifest: str, output: str, precision: str, cache: str):
    return score_small(manifest, output, precision, f"precision-{precision}", cache, SCORERS,
                       RUN_DATE)


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    # One feature cache for both runs: the bf16 run must extract its own reference features.
    cache = str(tmp_path_factory.mktemp("cache"))
    fp32 = _run(manifest, str(tmp_path_factory.mktemp("fp32")), "fp32", cache)
    bf16_out = str(tmp_path_factory.mktemp("bf16"))
    bf16 = _run(manifest, bf16_out, "bf16", cache)
    return fp32, bf16, bf16_out


def test_bf16_job_scores_every_query_close_to_fp32(runs):
    (_, fp32_all), (_, bf16_all), _ = runs
    assert len(bf16_all) == len(fp32_all) > 20
    assert bf16_all[KEY].equals(fp32_all[KEY])
    assert (bf16_all["reference_ids"].map(tuple) == fp32_all["reference_ids"].map(tuple)).all()
    inctrl = bf16_all["scorer"] == "inctrl"
    bf16, fp32 = bf16_all[inctrl], fp32_all[inctrl]
    # Training-free (no heads): holistic and image-residual scores are NaN by design. The text
    # prior's x100 temperature amplifies the bf16 image embedding's rounding.
    for column, tolerance in (("final_score", 5e-3), ("fine_score", 5e-3),
                              ("text_prior_score", 3e-2)):
        a, b = bf16[column].to_numpy(), fp32[column].to_numpy()
        assert np.isfinite(a).all()
        assert np.abs(a - b).max() < tolerance, column
    # What decides a user's ranking of the queries survives bf16.
    assert spearmanr(bf16["final_score"], fp32["final_score"]).statistic > 0.95
    # PatchCore's score is a distance in the CNN's feature space: relative closeness.
    a = bf16_all[~inctrl]["final_score"].to_numpy()
    b = fp32_all[~inctrl]["final_score"].to_numpy()
    assert np.isfinite(a).all() and not np.array_equal(a, b)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert spearmanr(a, b).statistic > 0.95


def test_every_row_names_its_precision(runs):
    (_, fp32), (_, bf16), _ = runs
    for scorer in SCORERS:
        ids = set(bf16.loc[bf16["scorer"] == scorer, "model_id"])
        assert len(ids) == 1 and ids.pop().endswith("|precision=bf16"), scorer
        fp32_ids = fp32.loc[fp32["scorer"] == scorer, "model_id"]
        assert not fp32_ids.str.contains("precision").any(), scorer


def test_bf16_job_does_not_reuse_fp32_reference_features(runs):
    (fp32_result, _), (bf16_result, _), _ = runs
    assert counter(fp32_result, "feature_cache_hits") == 0
    assert counter(bf16_result, "feature_cache_hits") == 0
    misses = counter(fp32_result, "feature_cache_misses")
    assert misses > 0 and counter(bf16_result, "feature_cache_misses") == misses


def test_summary_records_the_precision(runs):
    _, _, output = runs
    with open(os.path.join(output, SUMMARY, f"run_date={RUN_DATE}", "summary.json")) as f:
        extra = json.load(f)["extra"]
    assert extra["precision"] == "bf16"
    assert extra["run_id"] == "precision-bf16"
    assert set(extra["model_ids"]) == set(SCORERS)
    assert all(i.endswith("|precision=bf16") for i in extra["model_ids"].values())
