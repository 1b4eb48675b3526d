"""The scorer seam for real: a scorer added by one module and one registry entry runs end to
end through the job (flags, scores, summary, report) with no other file changed; a run
loads only the models its scorers need (a PatchCore-only run and demo need no CLIP
weights); every row names the model of its own scorer."""
from __future__ import annotations

import glob
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli.flags import parse_with_beam
from pipeline.cli.score import build_parser
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.scorers import registry
from pipeline.run import run_score
from tests.pipeline import toy_scorer

DATE = "2024-03-01"


@pytest.fixture
def meanref():
    registry.register(toy_scorer.ENTRY)
    yield toy_scorer.ENTRY
    registry.unregister(toy_scorer.ENTRY.name)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("demo")
    path = str(root / "manifest.parquet")
    pairs = generate_demo(str(root / "data"), seed=0, n_train=3, n_test_good=1,
                          n_test_defect_per_type=1)
    write_manifest(make_manifest(pairs).drop(columns=["mask_uri"]), path)
    return path


def _scores(output: str) -> pd.DataFrame:
    files = glob.glob(f"{output}/scores/**/*.parquet", recursive=True)
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_a_registered_scorer_runs_end_to_end(meanref, manifest, tmp_path):
    # its flag exists as soon as it is registered
    args, _ = parse_with_beam(build_parser(), ["--manifest", manifest, "--output", "o",
                                               "--scorer", "meanref,inctrl",
                                               "--meanref-power", "2"])
    assert args.scorer == ("meanref", "inctrl") and args.meanref_power == 2.0
    output = str(tmp_path / "out")
    config = ScoreConfig(manifest=manifest, output=output, k=2, seeds=(0,), backbone=tiny_spec(),
                         scorers=("meanref", "inctrl"), options={"meanref_power": 2.0},
                         run_date=DATE, run_id="toy")
    run_score(config, [])
    scores = _scores(output)
    mine = scores[scores["scorer"] == "meanref"]
    queries = pd.read_parquet(manifest).query("role == 'query'")
    assert len(mine) == len(queries) and len(scores) == 2 * len(queries)
    # the scores are the toy's formula on the tiny CLIP's embeddings of its own references
    backbone = get_backbone(tiny_spec())
    from PIL import Image

    def embed(uris):
        pixels = torch.stack([backbone.preprocess(Image.open(u).convert("RGB")) for u in uris])
        return backbone.encode_images(pixels).embeds

    for row in mine.head(3).itertuples():
        mean = F.normalize(embed(list(row.reference_uris)).mean(0), dim=-1)
        want = (1 - F.normalize(embed([row.image_uri]), dim=-1) @ mean).clamp_min(0) ** 2
        assert row.final_score == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert mine["model_id"].str.startswith("meanref[meanref_power=2.0]|").all()
    assert mine["scoring_mode"].eq("training-free").all() and mine["heads_hash"].isna().all()
    assert mine["fine_score"].isna().all()  # InCTRL's components stay null on its rows
    summary = pd.read_parquet(glob.glob(f"{output}/summary/run_date={DATE}/summary.parquet")[0])
    assert "meanref" in set(summary["scorer"])
    report = open(glob.glob(f"{output}/report/run_date={DATE}/index.html")[0]).read()
    assert "meanref[meanref_power=2.0]" in report  # the run table names its model


def test_rows_name_their_own_scorers_model(manifest, tmp_path):
    output = str(tmp_path / "out")
    config = ScoreConfig(manifest=manifest, output=output, k=1, seeds=(0,), backbone=tiny_spec(),
                         scorers=("inctrl", "patchcore"),
                         options={"cnn_backbone": "resnet18", "cnn_weights": "random:0"},
                         run_date=DATE, run_id="ids")
    run_score(config, [])
    scores = _scores(output)
    ids = scores.groupby("scorer")["model_id"].unique()
    assert list(ids["inctrl"]) == ["InCTRL-Tiny-ViT-TESTONLY@random:0|blocks=default|heads=none"]
    (patchcore,) = ids["patchcore"]
    assert patchcore.startswith("patchcore[patchcore_aggregation=mean,"
                                "patchcore_stage_dims=pooled,coreset_ratio=None]|cnn|"
                                "resnet18|random:0|(8, 16)|")
    assert "InCTRL" not in patchcore
    assert set(scores[scores.scorer == "patchcore"]["backbone"]) == {"resnet18"}
    report = open(glob.glob(f"{output}/report/run_date={DATE}/index.html")[0]).read()
    assert patchcore.replace("<", "&lt;") in report or patchcore in report


@pytest.fixture
def no_clip(monkeypatch):
    """Any attempt to create or download a CLIP model fails, as on a machine without its
    weights; so does asking whether they could be downloaded."""
    import open_clip

    import pipeline.demo as demo_mod

    def fail(*args, **kwargs):
        raise RuntimeError("open_clip: could not download laion400m_e32 (offline)")

    for name in ("create_model_and_transforms", "create_model", "create_model_from_pretrained"):
        monkeypatch.setattr(open_clip, name, fail)
    monkeypatch.setattr(demo_mod, "weights_obtainable", fail)


def test_a_patchcore_run_needs_no_clip_weights(no_clip, manifest, tmp_path):
    from pipeline.cli.score import main as score_main

    output = str(tmp_path / "out")
    assert score_main(["--manifest", manifest, "--output", output, "--k", "1", "--seeds", "0",
                       "--scorer", "patchcore", "--cnn-backbone", "resnet18",
                       "--cnn-weights", "random:0", "--run-date", DATE]) == 0
    scores = _scores(output)
    assert set(scores["scorer"]) == {"patchcore"} and len(scores) > 0
    # and a scorer that does read CLIP would fail here: the monkeypatch bites
    with pytest.raises(Exception, match="offline|not cached"):
        score_main(["--manifest", manifest, "--output", str(tmp_path / "o2"), "--k", "1",
                    "--seeds", "0", "--scorer", "inctrl", "--run-date", DATE])


def test_a_patchcore_demo_needs_no_clip_weights(no_clip, tmp_path, capsys):
    from pipeline.cli.demo import main as demo_main

    assert demo_main(["--workdir", str(tmp_path / "demo"), "--scorer", "patchcore",
                      "--cnn-backbone", "resnet18", "--cnn-weights", "random:0",
                      "--seeds", "0", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "| patchcore |" in out
    assert os.path.isdir(tmp_path / "demo" / "results" / "scores")
