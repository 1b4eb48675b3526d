"""Only RunInference holds the image model: other stages read the config (no device copy)."""
import pytest

import pipeline.model.backbone as backbone_mod
import pipeline.model.scorers.cnn as cnn_mod
from pipeline.core.config import ScoreConfig
from pipeline.core.images import ImageLimits
from pipeline.model.backbone import BackboneSpec, describe, tiny_spec
from pipeline.model.scorers.suite import SuiteSpec
from transforms.images import _LoadFn
from transforms.prompts import EncodePrompts
from transforms.score import _ScoreFn


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(spec):
        raise AssertionError(f"a full model was loaded for {spec}")

    monkeypatch.setattr(backbone_mod, "ClipBackbone", refuse)
    monkeypatch.setattr(cnn_mod, "CnnExtractor", refuse)


def test_decode_and_score_stages_load_no_model(no_model_loads, tmp_path):
    spec = BackboneSpec("ViT-B-16-plus-240", "random:7")  # not loaded anywhere in this process
    config = ScoreConfig(manifest="m", output=str(tmp_path), backbone=spec,
                         scorers=("inctrl", "winclip", "patchcore", "spade"),
                         options=dict(cnn_backbone="resnet18", cnn_weights="IMAGENET1K_V1"))
    for target in (SuiteSpec(("inctrl",), clip=spec), config.suite):
        load = _LoadFn(target, ImageLimits(max_pixels=10**8))
        load.setup()
    score = _ScoreFn(config, config.suite.identity(), str(tmp_path / "cache"))
    score.setup()
    assert score._scorers["inctrl"].model.geometry == describe(spec).geometry
    assert score._scorers["inctrl"].model.geometry.num_patches == 225
    assert score._scorers["winclip"].layout.grid == (15, 15)


def test_prompt_text_tower_can_stay_on_the_cpu():
    gpu = tiny_spec(device="cuda:0", precision="bf16")
    assert EncodePrompts(gpu, frozenset(), text_on_cpu=True)._fn._spec.device == "cpu"
    assert EncodePrompts(gpu, frozenset())._fn._spec.device == "cuda:0"


def test_described_preprocess_matches_the_loaded_model():
    import numpy as np
    import torch
    from PIL import Image

    spec = tiny_spec()
    image = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype("uint8"))
    loaded = backbone_mod.get_backbone(spec)
    info = backbone_mod._describe(spec)  # uncached: built from the config alone
    assert info.geometry == loaded.geometry
    assert torch.equal(info.preprocess(image), loaded.preprocess(image))
