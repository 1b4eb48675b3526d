"""The job with the CNN under OpenVINO (``--cnn-runtime openvino``): every query scored as
with torch (fp32: float32 rounding apart; bf16: ranked alike), each row's model id naming
the runtime, the compiled model cached once and reused by the next run, and a feature cache
that never serves torch's reference features to an OpenVINO run.

The reference is the same job with the CNN under torch (``tests/model/test_compiled.py``
checks the network itself against torch's forward).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.stats import spearmanr

from pipeline.model.precision import cpu_bf16
from tests.beamtest import SCORE_KEY, counter, score_small, small_demo_manifest

pytest.importorskip("openvino", reason="the optional openvino package is not installed")

RUN_DATE = "2024-05-06"
KEY = SCORE_KEY
SCORERS = ("padim", "patchcore")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return small_demo_manifest(tmp_path_factory.mktemp("compiled"))


def _run(manifest: str, output: str, runtime: str, compiled: str, features: str,
         precision: str = "fp32"):
    return score_small(manifest, output, precision, f"{runtime}-{precision}", features, SCORERS,
                       RUN_DATE, cnn_runtime=runtime, compiled_cache=compiled)


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    # One feature cache for every run: an OpenVINO run must extract its own references.
    features = str(tmp_path_factory.mktemp("features"))
    compiled = str(tmp_path_factory.mktemp("compiled"))
    out = {name: _run(manifest, str(tmp_path_factory.mktemp(name)), runtime, compiled,
                      features)
           for name, runtime in (("torch", "torch"), ("openvino", "openvino"),
                                 ("openvino-again", "openvino"))}
    return out, compiled


def test_openvino_fp32_scores_every_query_as_torch_does(runs):
    out, _ = runs
    (_, torch_rows), (_, ov_rows) = out["torch"], out["openvino"]
    assert len(ov_rows) == len(torch_rows) > 20
    assert ov_rows[KEY].equals(torch_rows[KEY])
    assert (ov_rows["reference_ids"].map(tuple) == torch_rows["reference_ids"].map(tuple)).all()
    for scorer in SCORERS:
        mine = (ov_rows["scorer"] == scorer).to_numpy()
        a = ov_rows.loc[mine, "final_score"].to_numpy()
        b = torch_rows.loc[mine, "final_score"].to_numpy()
        assert np.isfinite(a).all()
        # float32 rounding of another library's kernels; a bf16 forward would be ~1e-2
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
        assert spearmanr(a, b).statistic > 0.999, scorer


def test_every_row_names_its_runtime(runs):
    out, _ = runs
    (_, torch_rows), (_, ov_rows) = out["torch"], out["openvino"]
    for scorer in SCORERS:
        ids = set(ov_rows.loc[ov_rows["scorer"] == scorer, "model_id"])
        assert len(ids) == 1 and ids.pop().endswith("|runtime=openvino"), scorer
        assert not torch_rows["model_id"].str.contains("runtime").any()


def test_the_compiled_model_is_built_once_and_reused(runs):
    out, compiled = runs
    entries = [f for f in os.listdir(compiled) if f.endswith(".json")]
    assert len(entries) == 1  # one CNN, one precision, one input size
    (_, first), (_, again) = out["openvino"], out["openvino-again"]
    assert np.array_equal(first["final_score"].to_numpy(), again["final_score"].to_numpy())


def test_openvino_does_not_reuse_torch_reference_features(runs):
    out, _ = runs
    torch_misses = counter(out["torch"][0], "feature_cache_misses")
    assert torch_misses > 0
    assert counter(out["openvino"][0], "feature_cache_hits") == 0
    assert counter(out["openvino"][0], "feature_cache_misses") == torch_misses
    # the second OpenVINO run reads the first one's features
    assert counter(out["openvino-again"][0], "feature_cache_hits") == torch_misses


@pytest.mark.skipif(not cpu_bf16().native, reason="this CPU has no native bf16")
def test_openvino_bf16_ranks_the_queries_as_torch_fp32(runs, manifest, tmp_path):
    out, compiled = runs
    _, bf16 = _run(manifest, str(tmp_path / "out"), "openvino", compiled, str(tmp_path / "f"),
                   precision="bf16")
    _, fp32 = out["torch"]
    assert bf16[KEY].equals(fp32[KEY])
    assert bf16["model_id"].str.endswith("|precision=bf16|runtime=openvino").all()
    for scorer in SCORERS:
        mine = (bf16["scorer"] == scorer).to_numpy()
        a = bf16.loc[mine, "final_score"].to_numpy()
        b = fp32.loc[mine, "final_score"].to_numpy()
        assert not np.array_equal(a, b), "bf16 did not run"
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max(), scorer
        assert spearmanr(a, b).statistic > 0.95, scorer



def test_a_model_served_to_every_process_scores_alike(runs, manifest, tmp_path):
    """With the models in one process per machine (``share_model_across_processes``) the
    compiled CNN lives and runs there; the rows are those of the in-process run."""
    out, compiled = runs
    _, shared = score_small(manifest, str(tmp_path / "out"), "fp32", "openvino-shared",
                            str(tmp_path / "f"), SCORERS, RUN_DATE, share_model=True,
                            cnn_runtime="openvino", compiled_cache=compiled)
    _, alone = out["openvino"]
    assert shared[KEY].equals(alone[KEY])
    np.testing.assert_array_equal(shared["final_score"].to_numpy(),
                                  alone["final_score"].to_numpy())
