"""pipeline.model.backbone: geometry read from open_clip configs, and the features it extracts."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.backbone import (
    TINY_BACKBONE,
    BackboneLoadError,
    BackboneSpec,
    ClipBackbone,
    Geometry,
    default_blocks,
    get_backbone,
    tiny_spec,
)
from tests.model.helpers import texture


@pytest.fixture(scope="module")
def vitb() -> ClipBackbone:
    """ViT-B-16-plus-240 with random weights: geometry only, no download."""
    return ClipBackbone(BackboneSpec("ViT-B-16-plus-240", "random:0"))


def _blocks_by_hand(model, pixels):
    """Run open_clip's ViT step by step: patch tokens after every block and the embedding."""
    v = model.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)  # (B, patches, width)
    cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding)
    outs = []
    for blk in v.transformer.resblocks:
        if v.transformer.batch_first:
            x = blk(x)
        else:
            x = blk(x.transpose(0, 1)).transpose(0, 1)
        outs.append(x[:, 1:])
    embed = v.ln_post(x[:, 0]) @ v.proj
    return outs, embed


def test_tiny_geometry(tiny):
    assert tiny.geometry == Geometry(image_size=(64, 64), patch_size=(8, 8), grid=(8, 8),
                                     token_width=64, embed_dim=32, depth=4, blocks=(2, 3, 4))
    assert tiny.geometry.num_patches == 64 and tiny.geometry.num_layers == 3


def test_vitb_geometry(vitb):
    g = vitb.geometry
    assert g.image_size == (240, 240)
    assert g.patch_size == (16, 16)
    assert g.grid == (15, 15) and g.num_patches == 225
    assert g.token_width == 896
    assert g.embed_dim == 640
    assert g.depth == 12
    assert g.blocks == (7, 9, 11)


def test_vitb_features_have_that_geometry(vitb):
    f = vitb.encode_images(torch.randn(1, 3, 240, 240))
    assert f.tokens.shape == (1, 3, 225, 896)
    assert f.embeds.shape == (1, 640)


@pytest.mark.parametrize("depth, want", [(12, (7, 9, 11)), (4, (2, 3, 4)), (24, (14, 18, 22)),
                                         (1, (1,)), (2, (1, 2))])
def test_default_blocks(depth, want):
    assert default_blocks(depth) == want


def test_default_blocks_needs_a_block():
    with pytest.raises(ValueError):
        default_blocks(0)


def test_encode_images_matches_open_clip(tiny):
    pixels = tiny.preprocess_batch([texture(1), texture(2)])
    assert pixels.shape == (2, 3, 64, 64)
    f = tiny.encode_images(pixels)
    assert f.tokens.shape == (2, 3, 64, 64) and f.tokens.dtype == torch.float32
    assert f.embeds.shape == (2, 32) and f.embeds.dtype == torch.float32
    with torch.no_grad():
        outs, embed = _blocks_by_hand(tiny.model, pixels)
        want_embed = tiny.model.encode_image(pixels)
    for layer, block in enumerate(tiny.geometry.blocks):
        torch.testing.assert_close(f.tokens[:, layer], outs[block - 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.embeds, want_embed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.embeds, embed, atol=1e-5, rtol=1e-5)
    # Each block really differs, so the comparison above pins the block numbers.
    assert not torch.allclose(outs[1], outs[2], atol=1e-3)


@pytest.mark.parametrize("blocks, want", [((1, 4), (1, 4)), ((4, 1), (1, 4)), ((3, 3), (3,))])
def test_explicit_blocks_override(tiny, blocks, want):
    b = ClipBackbone(BackboneSpec(TINY_BACKBONE, "random:0", blocks=blocks))
    assert b.geometry.blocks == want
    pixels = tiny.preprocess_batch([texture(3)])
    f = b.encode_images(pixels)
    assert f.tokens.shape == (1, len(want), 64, 64)
    with torch.no_grad():
        outs, _ = _blocks_by_hand(b.model, pixels)
    for layer, block in enumerate(b.geometry.blocks):
        torch.testing.assert_close(f.tokens[:, layer], outs[block - 1], atol=1e-5, rtol=1e-5)


def test_blocks_deeper_than_the_model_are_refused():
    with pytest.raises(BackboneLoadError, match=r"exceed the depth 4"):
        ClipBackbone(BackboneSpec(TINY_BACKBONE, "random:0", blocks=(2, 5)))


def test_random_weights_follow_the_seed(tiny):
    same = ClipBackbone(tiny_spec()).model.state_dict()
    other = ClipBackbone(BackboneSpec(TINY_BACKBONE, "random:1")).model.state_dict()
    ref = tiny.model.state_dict()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["visual.conv1.weight"], other["visual.conv1.weight"])


def test_get_backbone_caches_per_spec(tiny):
    assert get_backbone(tiny_spec()) is tiny


def test_encode_texts_is_unit_norm(tiny):
    e = tiny.encode_texts(["a photo of a bottle.", "a photo of a damaged bottle."])
    assert e.shape == (2, 32)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))


def test_model_is_frozen(tiny):
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())


# ---------------------------------------------------------------------- spec and errors


@pytest.mark.parametrize("precision", ["fp16", "FP32", "int8", ""])
def test_spec_rejects_unknown_precision(precision):
    with pytest.raises(ValueError, match="precision"):
        BackboneSpec(precision=precision)


def test_spec_rejects_block_zero():
    with pytest.raises(ValueError, match="counted from 1"):
        BackboneSpec(blocks=(0, 3))


def test_tiny_spec_is_marked_test_only():
    spec = tiny_spec()
    assert "TESTONLY" in spec.backbone_id
    assert spec.is_test_only and spec.is_random and spec.random_seed == 0
    assert not BackboneSpec().is_test_only
    assert "TESTONLY" not in BackboneSpec().backbone_id


def test_backbone_id_names_weights_not_device():
    a = BackboneSpec("ViT-B-16-plus-240", "laion400m_e31", device="cpu", precision="fp32")
    b = BackboneSpec("ViT-B-16-plus-240", "laion400m_e31", device="cuda:0", precision="bf16")
    assert a.backbone_id == b.backbone_id == "ViT-B-16-plus-240@laion400m_e31"


def test_unknown_model_name_is_a_clear_load_error():
    with pytest.raises(BackboneLoadError, match=r"could not load backbone 'No-Such-ViT-9000'"):
        ClipBackbone(BackboneSpec("No-Such-ViT-9000", "random:0"))


def test_unknown_pretrained_tag_is_a_clear_load_error():
    with pytest.raises(BackboneLoadError, match=r"pretrained='no_such_tag'"):
        ClipBackbone(BackboneSpec(TINY_BACKBONE, "no_such_tag"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_load_error():
    with pytest.raises(BackboneLoadError, match="CUDA is not available"):
        ClipBackbone(tiny_spec(device="cuda"))
