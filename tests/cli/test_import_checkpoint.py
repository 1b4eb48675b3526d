"""`python -m pipeline import-checkpoint`, then `score --checkpoint HEADS` alone: the official
model, towers and heads, end to end."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline.cli import main
from pipeline.cli.score import parse_score_command
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import SCORES
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, ClipBackbone, tiny_spec
from pipeline.model.checkpoint import HeadsMetadata, import_official_checkpoint, load_heads, save_heads
from pipeline.run import run_score
from tests.beamtest import read_table
from tests.model.helpers import official_head, official_state, perturbed


def parse_score_args(argv):
    """(configuration, Beam's flags) of score's command line."""
    return parse_score_command(argv)[:2]


TINY = ["--backbone", TINY_BACKBONE]
DATASET = "medical_scans"


@pytest.fixture(scope="module")
def towers() -> dict:
    """Tiny-backbone towers with known weights, not those of random:0."""
    return perturbed(ClipBackbone(tiny_spec()).model.state_dict(), seed=7, scale=0.2)


@pytest.fixture(scope="module")
def official(tmp_path_factory, towers):
    """A small official-format checkpoint (DDP 'module.' keys): the towers plus InCTRL heads."""
    root = tmp_path_factory.mktemp("official")
    state = official_state(embed_dim=32, patches=64, seed=3, prefix="module.", towers=towers)
    torch.save({"model_state": state, "epoch": 9}, root / "official.pyth")
    assert main(["import-checkpoint", str(root / "official.pyth"), str(root / "heads.safetensors"),
                 "--k", "2", *TINY]) == 0
    return root, state


def test_import_writes_heads_and_towers_with_the_backbone_geometry(official):
    root, state = official
    heads, meta, _ = load_heads(str(root / "heads.safetensors"))
    assert (meta.backbone, meta.k) == (TINY_BACKBONE, 2)
    assert meta.blocks == (2, 3, 4) and meta.image_size == (64, 64)
    assert meta.towers == "heads.towers.safetensors" and (root / meta.towers).is_file()
    x = torch.randn(5, 64)
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    want = official_head(plain, "diff_head", x).float()
    torch.testing.assert_close(heads.holistic_head(x), want, atol=1e-5, rtol=1e-5)


def test_import_refuses_heads_of_another_geometry(tmp_path):
    source = tmp_path / "official.pyth"
    torch.save({"model_state": official_state(embed_dim=640, patches=225)}, source)
    assert main(["import-checkpoint", str(source), str(tmp_path / "h.safetensors"), *TINY]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.pyth"]


def test_import_refuses_a_checkpoint_without_towers(tmp_path, caplog):
    source = tmp_path / "official.pyth"
    torch.save({"model_state": official_state(embed_dim=32, patches=64)}, source)
    with caplog.at_level(logging.ERROR):
        assert main(["import-checkpoint", str(source), str(tmp_path / "h.safetensors"),
                     *TINY]) == 1
    assert "lacks the CLIP towers" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.pyth"]


def _score_args(root, out: str, *extra: str) -> list[str]:
    return ["--manifest", str(root / "manifest.parquet"), "--output", str(root / out),
            "--k", "2", "--seeds", "3", "--run-date", "2024-03-07", *extra]


@pytest.fixture(scope="module")
def scored(official, towers):
    """The same queries scored three ways: ``--checkpoint`` alone; the official heads on the
    towers loaded directly from a plain state-dict file; those heads on random:0 towers."""
    root, _ = official
    roots = generate_demo(str(root / "data"), image_size=32, n_train=3, n_test_good=2,
                          n_test_defect_per_type=1)
    write_manifest(make_manifest([r for r in roots if r[1] == DATASET]),
                   str(root / "manifest.parquet"))
    heads = import_official_checkpoint(str(root / "official.pyth"))
    meta = load_heads(str(root / "heads.safetensors"))[1]
    torch.save(towers, root / "direct.pt")
    for name, pretrained in (("direct", str(root / "direct.pt")), ("random0", TINY_PRETRAINED)):
        save_heads(heads, str(root / f"{name}.safetensors"), HeadsMetadata(
            TINY_BACKBONE, pretrained, meta.blocks, meta.image_size, meta.embed_dim,
            meta.num_patches, k=2))
    out = {}
    for name, checkpoint in (("imported", "heads"), ("direct", "direct"),
                             ("random0", "random0")):
        config, beam_args = parse_score_args(_score_args(
            root, name, "--checkpoint", str(root / f"{checkpoint}.safetensors")))
        run_score(config, beam_args)
        frame = read_table(config.output, SCORES)
        out[name] = (config, frame.set_index("image_id").sort_index())
    return out


def test_checkpoint_alone_runs_the_official_towers(scored):
    config, _ = scored["imported"]
    assert config.backbone.pretrained.endswith("heads.towers.safetensors")
    assert config.backbone.weights_sha256


def test_checkpoint_alone_scores_as_the_towers_loaded_directly(scored):
    imported, direct, random0 = (scored[n][1] for n in ("imported", "direct", "random0"))
    assert len(imported) > 0 and list(imported.index) == list(direct.index)
    assert (imported["scoring_mode"] == "inctrl-heads").all()
    for col in ("final_score", "fine_score", "holistic_score", "image_residual_score",
                "text_prior_score"):
        assert imported[col].to_numpy() == pytest.approx(direct[col].to_numpy(), abs=1e-6), col
    # ... and not as the random:0 towers the heads would otherwise have run on.
    assert abs(imported["final_score"].to_numpy() - random0["final_score"].to_numpy()).max() > 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--pretrained", TINY_PRETRAINED], "own CLIP towers"),
    (["--pretrained", "laion400m_e32"], "own CLIP towers"),
    (["--backbone", "ViT-B-16-plus-240"], f"backbone '{TINY_BACKBONE}'"),
])
def test_score_with_flags_that_contradict_the_heads_is_one_error(official, flags, message,
                                                                caplog):
    root, _ = official
    with caplog.at_level(logging.ERROR):
        assert main(["score", *_score_args(root, "refused", "--checkpoint",
                                           str(root / "heads.safetensors"), *flags)]) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0].getMessage()
    assert not (root / "refused").exists()


def test_without_a_checkpoint_the_default_is_e32():
    config, _ = parse_score_args(["--manifest", "m.parquet", "--output", "out"])
    assert config.backbone.pretrained == "laion400m_e32"
    assert config.backbone.name == "ViT-B-16-plus-240"
