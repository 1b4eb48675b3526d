"""Every extractor in bf16 on the CPU: the module's weights and input really are bf16, its
features leave as float32 and stay close to fp32's; every identity says the precision, and
fp32 identities are those of the runs before precision was recorded.

Tolerances are bf16's: 8 bits of mantissa (a relative rounding of 2⁻⁸ ≈ 0.4 % per value)
through a few layers of random weights. A wrong input scale or a missed conversion back to
float32 fails them by orders of magnitude. Execution tests need a CPU with native bf16 (the
job refuses bf16 elsewhere); the identity tests load nothing and run everywhere.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.backbone import ClipBackbone, get_backbone, tiny_spec
from pipeline.model.precision import BF16, FP32, cpu_bf16
from pipeline.model.scorers.cnn import CnnExtractor, CnnSpec
from pipeline.model.scorers.dino import DinoExtractor, DinoSpec
from pipeline.model.scorers.regad import (RegadExtractor, RegadModel, RegadSpec,
                                          SpatialTransformer, save_regad)
from pipeline.model.scorers.registry import extractor_entry
from pipeline.model.scorers.suite import SuiteSpec
from pipeline.model.scorers.winclip import WinClipExtractor

needs_bf16 = pytest.mark.skipif(not cpu_bf16().native,
                                reason="this CPU has no native bf16 (the job refuses it)")
SIZE = 64
SHALLOW_DINO = (("depth", 2),)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _pixels(n: int, size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_close_in_bf16(bf16: dict[str, torch.Tensor], fp32: dict[str, torch.Tensor],
                          tolerance: float = 0.05) -> None:
    assert set(bf16) == set(fp32)
    for key in fp32:
        assert bf16[key].dtype == torch.float32, key
        assert bf16[key].shape == fp32[key].shape, key
        assert bf16[key].is_contiguous(), key
        assert torch.isfinite(bf16[key]).all(), key
        assert not torch.equal(bf16[key], fp32[key]), f"{key}: bf16 did not run"
        assert _relative_error(bf16[key], fp32[key]) < tolerance, key


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


# --------------------------------------------------------------- execution


@needs_bf16
def test_clip_image_tower_runs_in_bf16_and_its_text_tower_in_fp32():
    fp32 = get_backbone(tiny_spec())
    bf16 = get_backbone(tiny_spec(precision=BF16))
    assert isinstance(bf16, ClipBackbone) and bf16.image_dtype == torch.bfloat16
    assert _dtypes(bf16.model.visual) == {torch.bfloat16}
    assert _dtypes(bf16.model.transformer) == {torch.float32}  # the text tower
    assert _dtypes(fp32.model.visual) == {torch.float32}  # its own copy, untouched
    x = _pixels(3, fp32.geometry.image_size)
    a, b = fp32.encode_images(x), bf16.encode_images(x)
    _assert_close_in_bf16({"tokens": b.tokens, "embeds": b.embeds},
                          {"tokens": a.tokens, "embeds": a.embeds})
    assert F.cosine_similarity(b.embeds, a.embeds, dim=-1).min() > 0.99


@needs_bf16
def test_winclip_windows_run_on_the_bf16_tower_and_leave_float32():
    fp32 = WinClipExtractor(get_backbone(tiny_spec()))
    bf16 = WinClipExtractor(get_backbone(tiny_spec(precision=BF16)))
    x = _pixels(2, fp32.backbone.geometry.image_size, seed=1)
    a, b = fp32.extract(x), bf16.extract(x)
    _assert_close_in_bf16(b, a)
    for key in a:  # unit vectors: every embedding keeps its direction
        assert F.cosine_similarity(b[key], a[key], dim=-1).min() > 0.99, key


@needs_bf16
def test_cnn_stages_run_in_bf16_channels_last():
    spec = CnnSpec("mobilenet_v2", "random:0", (4, 8, 16), pooled=True, image_size=SIZE)
    fp32 = CnnExtractor(spec)
    bf16 = CnnExtractor(CnnSpec(**{**spec.__dict__, "precision": BF16}))
    assert _dtypes(bf16._net) == {torch.bfloat16} and _dtypes(fp32._net) == {torch.float32}
    assert bf16.spec.channels_last and not fp32.spec.channels_last
    assert bf16.stages == fp32.stages  # the same stages at the same grids
    x = _pixels(2, SIZE, seed=2)
    _assert_close_in_bf16(bf16.extract(x), fp32.extract(x))


@needs_bf16
def test_dino_runs_in_bf16_rotated_references_included():
    spec = DinoSpec(weights="random:0", image_size=56, overrides=SHALLOW_DINO, rotations=4)
    fp32 = DinoExtractor(spec)
    bf16 = DinoExtractor(DinoSpec(**{**spec.__dict__, "precision": BF16}))
    assert _dtypes(bf16.model) == {torch.bfloat16}
    x = _pixels(2, 56, seed=3)
    a, b = fp32.extract_references(x), bf16.extract_references(x)
    assert set(a) == {"patches", "rotated"}
    _assert_close_in_bf16(b, a)


@needs_bf16
def test_regad_cnn_runs_in_bf16_its_transformers_and_registration_in_fp32():
    torch.manual_seed(0)
    model = RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE, seed=1))
    # a trained-looking network: every STN turns its map a little, so registration warps
    with torch.no_grad():
        for i, angle in enumerate((0.2, -0.1, 0.15), start=1):
            getattr(model.backbone, f"stn{i}").fc[2].bias.copy_(torch.tensor([angle, 1.0, 1.0]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = RegadExtractor(model)
    twin = RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE, seed=1))
    twin.load_state_dict(state)
    bf16 = RegadExtractor(twin, precision=BF16)
    stns = [m for m in twin.modules() if isinstance(m, SpatialTransformer)]
    assert len(stns) == 3 and all(_dtypes(m) == {torch.float32} for m in stns)
    assert torch.bfloat16 in _dtypes(twin.backbone.layer1)
    x = _pixels(2, SIZE, seed=4)
    _assert_close_in_bf16(bf16.extract(x), fp32.extract(x))


# --------------------------------------------------------------- identities (load nothing)


def _suite(precision: str, device: str = "cpu", **settings) -> SuiteSpec:
    scorers = ("inctrl", "spade", "padim", "patchcore", "winclip", "anomalydino")
    return SuiteSpec.of(scorers, tiny_spec(device=device, precision=precision),
                        cnn_weights="random:0", vit_weights="random:0", **settings)


@needs_bf16
def test_every_identity_carries_a_bf16_precision():
    fp32, bf16 = _suite(FP32), _suite(BF16)
    for ext in fp32.extractors:
        a, b = fp32.extractor_identity(ext), bf16.extractor_identity(ext)
        assert a != b and "precision=bf16" in b, ext
    for scorer, model_id in bf16.model_ids().items():
        assert "precision=bf16" in model_id and model_id != fp32.model_ids()[scorer]


def test_fp32_identities_are_those_of_before():
    """fp32 adds nothing to the extractors that never named a precision (the CNN, DINO,
    RegAD), so rows and feature caches of earlier fp32 runs keep their identities; CLIP's
    always named it (``feature_id``)."""
    suite = _suite(FP32)
    for ext in ("cnn", "dino"):
        identity = suite.extractor_identity(ext)
        assert "precision" not in identity
        spec = suite.extractor_spec(ext)
        assert spec.precision == FP32
        assert extractor_entry(ext).identity(type(spec)(**{
            k: v for k, v in spec.__dict__.items() if k != "precision"})) == identity
    assert suite.extractor_identity("clip").endswith("|precision=fp32")
    # tf32 is fp32 arithmetic for these extractors (CUDA matrix products are CLIP's)
    tf32 = _suite("tf32")
    assert tf32.extractor_identity("cnn") == suite.extractor_identity("cnn")


def test_regad_identity_names_its_precision(tmp_path, monkeypatch):
    from pipeline.model import precision

    monkeypatch.setattr(precision, "check_precision", lambda device, p: None)
    path = str(tmp_path / "regad.safetensors")
    save_regad(RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE)), path)
    ids = {p: SuiteSpec.of(("regad",), tiny_spec(precision=p), regad_checkpoint=path)
           .extractor_identity("regad") for p in (FP32, BF16)}
    assert "precision" not in ids[FP32]
    assert ids[BF16] == ids[FP32] + "|precision=bf16"


def test_on_cuda_the_module_extractors_keep_fp32_and_their_identity():
    """A GPU's bf16 is CLIP's autocast; the CNN and DINO forwards there run as before, in
    fp32 (no GPU was reachable to measure them in bf16), and say so."""
    gpu = _suite(BF16, device="cuda")
    assert gpu.extractor_spec("cnn").precision == FP32
    assert gpu.extractor_spec("dino").precision == FP32
    assert "precision" not in gpu.extractor_identity("cnn")
    assert gpu.extractor_identity("clip").endswith("|precision=bf16")
