"""The DINOv2 extractor with random weights: shapes from the model, preprocessing, weight
sources (random:SEED, local files), and AnomalyDINO end to end."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.model.backbone import BackboneLoadError
from pipeline.model.scorers.anomalydino import PATCHES, AnomalyDinoScorer
from pipeline.model.scorers.dino import (
    DEFAULT_DINO, DinoExtractor, DinoSpec, dino_preprocess, dino_view_preprocess,
    get_dino_extractor)

# The real ViT-S/14 DINOv2 architecture cut to two blocks and a 56-pixel native grid: the
# same patch embedding, width and prefix tokens at a fraction of the set-up time.
SHALLOW = (("depth", 2), ("img_size", 56))


def spec(**kw) -> DinoSpec:
    return DinoSpec(**{"weights": "random:0", "image_size": 56, "overrides": SHALLOW, **kw})


@pytest.fixture(scope="module")
def dino() -> DinoExtractor:
    return DinoExtractor(spec())


def pixels(batch=2, h=56, w=70, seed=0):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_the_paper_architecture_shapes_come_from_the_model():
    full = DinoExtractor(DinoSpec(weights="random:1", image_size=56))  # the real ViT-S/14
    assert full.patch_size == (14, 14) and full.width == 384 and full.num_prefix_tokens == 1
    out = full.extract(pixels(1, 56, 56))
    assert out[PATCHES].shape == (1, 4, 4, 384)
    assert full.identity.startswith("dino:vit_small_patch14_dinov2@random:1:size=56")


def test_patch_grid_is_the_input_size_over_the_patch_size(dino):
    out = dino.extract(pixels())
    assert out[PATCHES].shape == (2, 56 // 14, 70 // 14, dino.width)
    assert out[PATCHES].dtype == torch.float32 and out[PATCHES].device == dino.device
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dino.extract(pixels(1, 60, 56))


def test_references_come_with_their_rotations(dino):
    """The official default: every reference also at 45°, 90°, ..., 315° (8 in all)."""
    from pipeline.model.augment import rotate
    from pipeline.model.scorers.anomalydino import ROTATED

    x = pixels(2, 56, 56)
    refs = dino.extract_references(x)
    assert refs[PATCHES].shape == (2, 4, 4, dino.width)
    assert refs[ROTATED].shape == (2, 7, 4, 4, dino.width)
    assert torch.allclose(refs[PATCHES], dino.extract(x)[PATCHES])
    assert torch.allclose(refs[ROTATED][:, 1], dino.extract(rotate(x, 90.0))[PATCHES],
                          atol=1e-4)
    once = DinoExtractor(spec(rotations=1))
    assert set(once.extract_references(x)) == {PATCHES}
    assert dino.identity.endswith(":rotations=8") and "rotations" not in once.identity
    with pytest.raises(ValueError, match="rotations"):
        spec(rotations=0)


def test_preprocess_resizes_normalises_and_crops_to_patches(dino):
    image = Image.new("RGB", (150, 100), (255, 128, 0))
    assert dino.preprocess()(image).shape == (3, 56, 56)
    square = dino_preprocess(60, False, dino.patch_size, dino.mean, dino.std)(image)
    assert square.shape == (3, 56, 56)  # 60 x 60, cropped to 4 x 14
    aspect = dino_preprocess(56, True, dino.patch_size, dino.mean, dino.std)(image)
    assert aspect.shape == (3, 56, 84)  # shorter side 56, the other 84 = 6 x 14
    assert dino.mean == (0.485, 0.456, 0.406)  # ImageNet, from the model's pretrained config
    assert square[0].mean().item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-3)


def test_decoding_workers_get_the_same_transform_without_weights(dino, monkeypatch):
    import timm

    real = timm.create_model

    def no_weights(*args, **kw):
        assert not kw.get("pretrained"), "the view's transform must not load weights"
        return real(*args, **kw)

    monkeypatch.setattr(timm, "create_model", no_weights)
    image = Image.new("RGB", (150, 100), (255, 128, 0))
    for size, aspect in ((56, False), (60, False), (56, True)):
        s = spec(image_size=size, keep_aspect=aspect)
        view = dino_view_preprocess(s)(image)
        assert torch.equal(view, dino_preprocess(size, aspect, dino.patch_size, dino.mean,
                                                 dino.std)(image))


def test_random_seed_is_deterministic(dino):
    x = pixels(1)
    again = DinoExtractor(spec())
    other = DinoExtractor(spec(weights="random:7"))
    assert torch.equal(again.extract(x)[PATCHES], dino.extract(x)[PATCHES])
    assert not torch.allclose(other.extract(x)[PATCHES], dino.extract(x)[PATCHES])
    assert get_dino_extractor(spec()) is get_dino_extractor(spec())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_state_dict_loads(dino, tmp_path, suffix):
    path = tmp_path / f"dino{suffix}"
    state = {k: v.contiguous() for k, v in dino.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a wrapped dict, read with weights_only
    loaded = DinoExtractor(spec(weights=str(path)))
    x = pixels(1)
    assert torch.equal(loaded.extract(x)[PATCHES], dino.extract(x)[PATCHES])
    assert f"@dino{suffix}#sha256=" in loaded.identity


def test_original_dinov2_key_names_load(dino, tmp_path):
    state = dict(dino.model.state_dict())
    state["mask_token"] = torch.zeros(1, dino.width)  # facebookresearch/dinov2's own key
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(state, path)
    x = pixels(1)
    assert torch.equal(DinoExtractor(spec(weights=str(path))).extract(x)[PATCHES],
                       dino.extract(x)[PATCHES])


def test_bad_weights_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DinoExtractor(spec(weights=str(tmp_path / "missing.safetensors")))
    wrong = tmp_path / "wrong.pt"
    torch.save({"blocks.0.nonsense": torch.zeros(1)}, wrong)
    with pytest.raises(BackboneLoadError, match="does not fit"):
        DinoExtractor(spec(weights=str(wrong)))
    with pytest.raises(ValueError, match="integer seed"):
        spec(weights="random:x")


def test_weight_sources_resolve_to_timm_names():
    assert DinoSpec().timm_name == DEFAULT_DINO == "vit_small_patch14_dinov2.lvd142m"
    assert DinoSpec(weights="lvd142m", name="vit_base_patch14_dinov2").timm_name \
        == "vit_base_patch14_dinov2.lvd142m"
    assert DinoSpec(weights="random:3").is_random and DinoSpec(weights="w/x.pt").is_file
    assert not DinoSpec(weights="lvd142m").is_file


def test_anomalydino_end_to_end_identical_and_perturbed(dino):
    refs = dino.extract(pixels(2, 56, 56, seed=1))
    scorer = AnomalyDinoScorer()
    memory = scorer.build_memory(refs)
    assert scorer.score({PATCHES: refs[PATCHES][:1]}, memory).score.item() < 1e-5
    bad = pixels(1, 56, 56, seed=1)
    bad[..., 14:28, 28:42] = 4.0  # patch (1, 2)
    out = scorer.score(dino.extract(bad), memory)
    assert divmod(int(out.patch_map[0].argmax()), 4) == (1, 2)
    assert out.score.item() > 1e-3
