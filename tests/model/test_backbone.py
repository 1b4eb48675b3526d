"""pipeline.model.backbone: geometry read from open_clip configs, and the features it extracts."""
from __future__ import annotations

import hashlib
import io
import os
import uuid

import fsspec
import open_clip
import pytest
import torch
from safetensors.torch import save as st_save

import pipeline.model.backbone as backbone_mod
from pipeline.model.backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    TINY_BACKBONE,
    BackboneLoadError,
    BackboneSpec,
    ClipBackbone,
    Geometry,
    ReleaseFile,
    checksum_in_name,
    default_blocks,
    get_backbone,
    known_sha256,
    release_file,
    resolve_weights,
    substituted_tag,
    tiny_spec,
    weights_cache_dir,
    weights_obtainable,
)
from tests.model.helpers import texture


def _stack(backbone, images):
    """Images through the backbone's own transform, stacked: (n, 3, H, W)."""
    return torch.stack([backbone.preprocess(im) for im in images])


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
    pixels = _stack(tiny, [texture(1), texture(2)])
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
    pixels = _stack(tiny, [texture(3)])
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


# ---------------------------------------------------------------------- weights: which, checked

E32_FILE = "vit_b_16_plus_240-laion400m_e32-699c4b84.pt"


def test_the_default_is_the_weights_inctrl_used():
    assert DEFAULT_PRETRAINED == "laion400m_e32"
    assert BackboneSpec().backbone_id == "ViT-B-16-plus-240@laion400m_e32"


@pytest.mark.parametrize("tag", ["laion400m_e32", "LAION400M-E32"])
def test_e32_resolves_to_the_e32_release_file(tag):
    release = release_file(DEFAULT_BACKBONE, tag)
    assert release.filename == E32_FILE
    assert release.sha256 == "699c4b84"
    assert release.url.startswith("https://github.com/mlfoundations/open_clip/releases/")
    assert "e31" not in release.url
    # The release URL is open_clip's own; only its hub entry is wrong.
    assert open_clip.get_pretrained_url(DEFAULT_BACKBONE, "laion400m_e32") == release.url
    assert release_file(DEFAULT_BACKBONE, "laion400m_e31") is None


def test_checksum_in_name():
    assert checksum_in_name(E32_FILE) == "699c4b84"
    assert checksum_in_name("open_clip_pytorch_model.bin") == ""
    assert checksum_in_name("ViT-B-32.pt") == ""
    with pytest.raises(ValueError, match="no sha256"):
        ReleaseFile("https://example.invalid/weights.pt")


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed (they go to a fake ``_download``; the suite itself runs offline)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


class _Downloads:
    """Stands in for the network: records each URL asked for, writes the bytes it was given."""

    def __init__(self, data: bytes) -> None:
        self.data, self.urls = data, []

    def __call__(self, url: str, target: str) -> None:
        self.urls.append(url)
        with open(target, "wb") as f:
            f.write(self.data)


def test_e32_download_with_the_wrong_checksum_is_refused_and_not_kept(tmp_path, monkeypatch, online):
    fake = _Downloads(b"these are the e31 weights, say")
    monkeypatch.setattr(backbone_mod, "_download", fake)
    with pytest.raises(BackboneLoadError, match="not the weights asked for"):
        resolve_weights(BackboneSpec(), cache_dir=str(tmp_path))
    assert len(fake.urls) == 1 and E32_FILE in fake.urls[0] and "e31" not in fake.urls[0]
    assert list(tmp_path.iterdir()) == []  # nothing half-checked is left to be found later


def test_a_cached_e32_file_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    fake = _Downloads(b"")
    monkeypatch.setattr(backbone_mod, "_download", fake)
    (tmp_path / E32_FILE).write_bytes(b"a truncated download")
    with pytest.raises(BackboneLoadError, match=rf"delete .*{E32_FILE}"):
        resolve_weights(BackboneSpec(), cache_dir=str(tmp_path))
    assert fake.urls == []  # refused, not silently replaced


def test_a_failed_download_is_a_load_error(tmp_path, monkeypatch, online):
    def offline(url, target):
        raise OSError("network is unreachable")

    monkeypatch.setattr(backbone_mod, "_download", offline)
    with pytest.raises(BackboneLoadError, match=rf"could not fetch .*place the file at .*{E32_FILE}"):
        resolve_weights(BackboneSpec(), cache_dir=str(tmp_path))


def test_a_local_file_named_as_the_e32_release_is_checked(tmp_path):
    path = tmp_path / E32_FILE
    path.write_bytes(b"not the e32 weights")
    with pytest.raises(BackboneLoadError, match="699c4b84"):
        resolve_weights(BackboneSpec(pretrained=str(path)))
    assert known_sha256(DEFAULT_BACKBONE, str(path)) == "699c4b84"
    assert known_sha256(DEFAULT_BACKBONE, str(tmp_path / "my_weights.pt")) == ""


def _tiny_weights_file(tmp_path, seed: int) -> tuple[dict, bytes]:
    state = ClipBackbone(BackboneSpec(TINY_BACKBONE, f"random:{seed}")).model.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return state, buf.getvalue()


@pytest.fixture
def tiny_release(tmp_path, monkeypatch):
    """A release file of the tiny backbone (tag 'fake_e32'), its weights those of random:3."""
    state, data = _tiny_weights_file(tmp_path, seed=3)
    sha = hashlib.sha256(data).hexdigest()
    release = ReleaseFile(f"https://example.invalid/tiny-fake_e32-{sha[:8]}.pt")
    monkeypatch.setitem(backbone_mod._RELEASE_FILES, (TINY_BACKBONE, "fake_e32"), release)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # weights_cache_dir() is under it
    return release, state, data


def _assert_weights(model, want):
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_release_file_is_downloaded_checked_cached_and_loaded(tiny_release, monkeypatch, online):
    release, state, data = tiny_release
    fake = _Downloads(data)
    monkeypatch.setattr(backbone_mod, "_download", fake)
    spec = BackboneSpec(TINY_BACKBONE, "fake_e32")
    _assert_weights(ClipBackbone(spec).model, state)
    assert fake.urls == [release.url]
    cached = os.path.join(weights_cache_dir(), release.filename)
    assert open(cached, "rb").read() == data
    _assert_weights(ClipBackbone(spec).model, state)  # from the cache, checked again
    assert fake.urls == [release.url]
    assert weights_obtainable(spec)


def test_weights_sha256_is_checked_before_loading(tmp_path):
    state, data = _tiny_weights_file(tmp_path, seed=4)
    path = tmp_path / "tiny.pt"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    spec = BackboneSpec(TINY_BACKBONE, str(path), weights_sha256=sha)
    _assert_weights(ClipBackbone(spec).model, state)
    assert spec.backbone_id == f"{TINY_BACKBONE}@tiny.pt#sha256={sha[:12]}"
    wrong = "0" * 64 if not sha.startswith("0") else "1" * 64
    with pytest.raises(BackboneLoadError, match="not the weights asked for"):
        ClipBackbone(BackboneSpec(TINY_BACKBONE, str(path), weights_sha256=wrong))
    with pytest.raises(BackboneLoadError, match="does not exist"):
        ClipBackbone(BackboneSpec(TINY_BACKBONE, str(tmp_path / "gone.pt"), weights_sha256=sha))


def test_a_remote_weights_file_is_fetched_and_checked(tmp_path, monkeypatch):
    state, data = _tiny_weights_file(tmp_path, seed=5)
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = f"memory://weights/{uuid.uuid4().hex}/tiny.towers.safetensors"
    with fsspec.open(url, "wb") as f:
        f.write(st_save(state))
    real = hashlib.sha256(st_save(state)).hexdigest()
    _assert_weights(ClipBackbone(BackboneSpec(TINY_BACKBONE, url, weights_sha256=real)).model,
                    state)
    with pytest.raises(BackboneLoadError, match="not the weights asked for"):
        ClipBackbone(BackboneSpec(TINY_BACKBONE, url, weights_sha256=sha))


@pytest.mark.parametrize("bad", ["abc", "G" * 8, "ABCDEF12", "0" * 65])
def test_weights_sha256_must_be_hex(bad):
    with pytest.raises(ValueError, match="weights_sha256"):
        BackboneSpec(weights_sha256=bad)


def test_a_tag_that_open_clip_maps_to_other_weights_is_refused(monkeypatch):
    from open_clip import pretrained as oc_pretrained

    fake = {
        "good_e1": {"hf_hub": "org/tiny_model.good_e1/"},
        "bad_e2": {"hf_hub": "org/tiny_model.good_e1/"},  # the e32 → e31 mistake
        "alias": {"hf_hub": "org/tiny_model.something_else/"},  # not another tag: an alias
    }
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY_BACKBONE, fake)
    assert substituted_tag(TINY_BACKBONE, "bad_e2") == "good_e1"
    assert substituted_tag(TINY_BACKBONE, "good_e1") is None
    assert substituted_tag(TINY_BACKBONE, "alias") is None
    with pytest.raises(BackboneLoadError, match=r"loads the weights of 'good_e1'"):
        ClipBackbone(BackboneSpec(TINY_BACKBONE, "bad_e2"))


def test_open_clip_tables_other_tags_are_consistent():
    assert substituted_tag(DEFAULT_BACKBONE, "laion400m_e31") is None
    assert substituted_tag("ViT-B-16", "laion400m_e32") is None
    assert substituted_tag("ViT-B-32", "metaclip_fullcc") is None


def test_offline_an_uncached_release_fails_at_once(tmp_path, monkeypatch):
    fake = _Downloads(b"")
    monkeypatch.setattr(backbone_mod, "_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(BackboneLoadError, match=rf"not cached .*place .*{E32_FILE}"):
        ClipBackbone(BackboneSpec())
    assert fake.urls == [] and not weights_obtainable(BackboneSpec())
