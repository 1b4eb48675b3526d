"""RegAD and CoOp in the job, behind the registry like every scorer: their checkpoints (made
here from seeded, untrained networks: the job's wiring is under test, not their training,
which tests/train covers) are hashed into their rows' model ids; RegAD's references come
with their 22 augmentations; CoOp scores at any k, k = 0 included; a run without their
checkpoint is one usage error naming the train command."""
from __future__ import annotations

import glob

import pandas as pd
import pytest

from pipeline.cli.flags import parse_with_beam
from pipeline.cli.score import build_parser
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.scorers.coop import CoopPrompts, save_coop
from pipeline.model.scorers.regad import VIEWS, RegadModel, RegadSpec, save_regad
from pipeline.run import run_score

DATE = "2024-04-01"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    manifest = str(root / "manifest.parquet")
    pairs = generate_demo(str(root / "data"), seed=0, n_train=2, n_test_good=1,
                          n_test_defect_per_type=1)
    frame = make_manifest(pairs).drop(columns=["mask_uri"])
    write_manifest(frame[frame["dataset"] == frame["dataset"].iloc[0]], manifest)
    regad = str(root / "regad.safetensors")
    regad_hash = save_regad(RegadModel(RegadSpec("resnet18", "random:0", image_size=64)), regad)
    backbone = get_backbone(tiny_spec())
    coop = str(root / "coop.safetensors")
    prompts = CoopPrompts(backbone.model, backbone.tokenizer, n_ctx=4, seed=0)
    coop_hash = save_coop(prompts, coop, backbone.spec.name, backbone.spec.weights_id,
                          backbone.geometry.embed_dim)
    return {"manifest": manifest, "regad": regad, "coop": coop, "regad_hash": regad_hash,
            "coop_hash": coop_hash, "root": root}


def _scores(output: str) -> pd.DataFrame:
    files = glob.glob(f"{output}/scores/**/*.parquet", recursive=True)
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_regad_and_coop_score_beside_the_others(setup, tmp_path):
    output = str(tmp_path / "out")
    config = ScoreConfig(manifest=setup["manifest"], output=output, k=1, seeds=(0,),
                         backbone=tiny_spec(), scorers=("inctrl", "regad", "coop"),
                         options={"regad_checkpoint": setup["regad"],
                                  "coop_checkpoint": setup["coop"]},
                         run_date=DATE, run_id="trained", write_anomaly_maps=True)
    run_score(config, [])
    scores = _scores(output)
    queries = pd.read_parquet(setup["manifest"]).query("role == 'query'")
    assert len(scores) == 3 * len(queries)
    for scorer, digest in (("regad", setup["regad_hash"]), ("coop", setup["coop_hash"])):
        mine = scores[scores["scorer"] == scorer]
        assert len(mine) == len(queries) and mine["final_score"].notna().all()
        assert mine["scoring_mode"].eq("trained").all()
        assert mine["heads_hash"].eq(digest).all()
        assert mine["model_id"].str.contains(f"checkpoint={digest}").all()
    regad = scores[scores["scorer"] == "regad"]
    assert regad["anomaly_map_uri"].notna().all()  # RegAD has a map; CoOp has none
    assert scores[scores["scorer"] == "coop"]["anomaly_map_uri"].isna().all()
    assert regad["backbone"].eq("resnet18").all()
    assert regad["pretrained"].str.startswith("regad.safetensors#sha256=").all()


def test_regads_references_come_with_their_augmentations(setup):
    from pipeline.model.scorers.suite import SuiteSpec, get_feature_suite, suite_preprocess
    from PIL import Image

    suite = SuiteSpec.of(("regad",), tiny_spec(), regad_checkpoint=setup["regad"])
    frame = pd.read_parquet(setup["manifest"])
    uris = frame.query("role == 'reference'")["image_uri"].tolist()[:2]
    pre = suite_preprocess(suite)
    views = [pre(Image.open(u).convert("RGB")) for u in uris]
    import torch

    batch = {v: torch.stack([b[v] for b in views]) for v in views[0].keys()}
    refs = get_feature_suite(suite).extract(batch, references=True).part("regad")
    assert refs["views_s4"].shape[:2] == (2, VIEWS)  # per image: its 22 views
    assert torch.allclose(refs["views_s4"][:, 0], refs["s4"], atol=1e-5)  # view 0: itself


def test_coop_scores_zero_shot(setup, tmp_path):
    output = str(tmp_path / "zero")
    config = ScoreConfig(manifest=setup["manifest"], output=output, k=0, seeds=(0,),
                         backbone=tiny_spec(), scorers=("coop",),
                         options={"coop_checkpoint": setup["coop"]}, run_date=DATE)
    run_score(config, [])
    scores = _scores(output)
    assert set(scores["scorer"]) == {"coop"} and scores["k_used"].eq(0).all()
    assert scores["scoring_mode"].eq("zero-shot").all()


@pytest.mark.parametrize("scorer, train", [("regad", "--method regad"),
                                           ("coop", "--method coop")])
def test_without_a_checkpoint_is_one_usage_error(scorer, train, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_with_beam(build_parser(), ["--manifest", "m", "--output", "o", "--scorer", scorer])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--{scorer}-checkpoint" in err and f"python -m pipeline train {train}" in err
