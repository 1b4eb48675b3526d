"""pipeline.model.loading: the backbone a heads file runs on, and refusal of any other."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.model.backbone import (
    TINY_BACKBONE,
    TINY_PRETRAINED,
    BackboneLoadError,
    BackboneSpec,
    ClipBackbone,
    describe,
    tiny_spec,
)
from pipeline.model.checkpoint import (
    CheckpointError,
    HeadsMetadata,
    convert_official_checkpoint,
    read_heads_metadata,
    save_heads,
)
from pipeline.model.heads import InCTRLHeads
from pipeline.model.loading import backbone_for_heads, build_model, get_model
from tests.model.helpers import official_state, perturbed


@pytest.fixture(scope="module")
def towers() -> dict:
    return perturbed(ClipBackbone(tiny_spec()).model.state_dict(), seed=21)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, towers) -> str:
    """Heads imported from a tiny official-format checkpoint, with their towers beside them."""
    root = tmp_path_factory.mktemp("imported")
    torch.save({"model_state": official_state(32, 64, seed=2, prefix="module.", towers=towers)},
               root / "official.pyth")
    convert_official_checkpoint(str(root / "official.pyth"), str(root / "heads.safetensors"),
                                backbone=TINY_BACKBONE, geometry=describe(tiny_spec()).geometry,
                                k=4)
    return str(root / "heads.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """Heads trained on the tiny backbone's random:0 weights (no towers of their own)."""
    path = tmp_path_factory.mktemp("trained") / "heads.safetensors"
    g = describe(tiny_spec()).geometry
    save_heads(InCTRLHeads.seeded(g.embed_dim, g.num_patches, seed=0), str(path),
               HeadsMetadata(TINY_BACKBONE, TINY_PRETRAINED, g.blocks, g.image_size,
                             g.embed_dim, g.num_patches, k=2))
    return str(path)


def test_imported_heads_run_on_their_own_towers(imported, towers):
    meta = read_heads_metadata(imported)
    spec = backbone_for_heads(imported)
    assert spec.name == TINY_BACKBONE and spec.blocks == ()
    assert spec.pretrained.endswith("/heads.towers.safetensors")
    assert spec.weights_sha256 == meta.towers_sha256
    assert spec.backbone_id == (f"{TINY_BACKBONE}@heads.towers.safetensors"
                                f"#sha256={meta.towers_sha256[:12]}")
    got = ClipBackbone(spec).model.state_dict()
    assert all(torch.equal(got[k], towers[k]) for k in towers)
    scorer, digest = get_model(spec, imported)
    assert scorer.heads is not None and digest != "none"


@pytest.mark.parametrize("pretrained", [TINY_PRETRAINED, "laion400m_e32", "random:1"])
def test_other_weights_than_the_heads_towers_are_refused(imported, pretrained):
    with pytest.raises(CheckpointError, match=r"own CLIP towers heads.towers.safetensors"):
        backbone_for_heads(imported, pretrained=pretrained)


def test_the_towers_file_itself_may_be_named(imported, tmp_path):
    copy = tmp_path / "same.safetensors"
    shutil.copy(backbone_for_heads(imported).pretrained, copy)
    assert backbone_for_heads(imported, pretrained=str(copy)) == backbone_for_heads(imported)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="other weights"):
        backbone_for_heads(imported, pretrained=str(copy))


def test_another_backbone_than_the_heads_is_refused(imported, trained):
    for checkpoint in (imported, trained):
        with pytest.raises(CheckpointError, match=rf"backbone '{TINY_BACKBONE}', not "
                                                  r"'ViT-B-16-plus-240'"):
            backbone_for_heads(checkpoint, name="ViT-B-16-plus-240")
        assert backbone_for_heads(checkpoint, name=TINY_BACKBONE).name == TINY_BACKBONE


def test_other_blocks_than_the_heads_are_refused(imported):
    with pytest.raises(CheckpointError, match=r"blocks \[2, 3, 4\], not \[1, 4\]"):
        backbone_for_heads(imported, blocks=(1, 4))
    assert backbone_for_heads(imported, blocks=(2, 3, 4)).blocks == (2, 3, 4)


def test_trained_heads_run_on_the_weights_they_were_trained_on(trained):
    spec = backbone_for_heads(trained, device="cpu", precision="fp32")
    assert spec == tiny_spec()
    assert backbone_for_heads(trained, pretrained=TINY_PRETRAINED) == tiny_spec()
    with pytest.raises(CheckpointError, match=r"trained on pretrained='random:0', not 'random:1'"):
        backbone_for_heads(trained, pretrained="random:1")


def test_heads_whose_geometry_the_backbone_lacks_are_refused(tmp_path):
    path = tmp_path / "h.safetensors"
    save_heads(InCTRLHeads(16, 64), str(path),
               HeadsMetadata(TINY_BACKBONE, TINY_PRETRAINED, (2, 3, 4), (64, 64), 16, 64, k=2))
    with pytest.raises(CheckpointError, match="embed_dim=16.*embed_dim=32"):
        backbone_for_heads(str(path))


def test_the_scorer_refuses_heads_with_towers_on_other_weights(imported):
    spec = backbone_for_heads(imported)
    geometry = describe(spec).geometry
    for other in (tiny_spec(), BackboneSpec(TINY_BACKBONE, spec.pretrained)):
        with pytest.raises(CheckpointError, match="own CLIP towers"):
            build_model(geometry, imported, other)
    assert build_model(geometry, imported, spec)[0].heads is not None


def test_towers_changed_after_the_import_are_refused_when_loaded(imported, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(backbone_for_heads(imported).pretrained.rsplit("/", 1)[0], root)
    towers = root / "heads.towers.safetensors"
    data = bytearray(towers.read_bytes())
    data[-1] ^= 1
    towers.write_bytes(bytes(data))
    spec = backbone_for_heads(str(root / "heads.safetensors"))
    with pytest.raises(BackboneLoadError, match="not the weights asked for"):
        ClipBackbone(spec)
