"""pipeline.model.residual against loops written from the paper and hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import residual
from pipeline.model.residual import (
    image_residual,
    normalize_reference_tokens,
    patch_anomaly_map,
    patch_residual_map,
    text_prior,
)
from tests.model.helpers import residual_loop

# (batch, layers, patches, width, k)
SHAPES = [
    (1, 1, 4, 3, 1),
    (3, 3, 9, 8, 1),
    (2, 3, 9, 8, 16),
    (1, 2, 16, 12, 4),
    (4, 3, 16, 8, 2),
]


def _random(batch, layers, patches, width, k, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, layers, patches, width, generator=g)
    refs = torch.randn(k, layers, patches, width, generator=g) * 2.5 + 0.3
    return query, refs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-P{}-W{}-k{}".format(*s))
def test_patch_residual_equals_paper_loop(shape):
    query, refs = _random(*shape, seed=sum(shape))
    want_layers, want_map, want_fine = residual_loop(query, refs)

    ref_unit = normalize_reference_tokens(refs)
    got_layers = patch_residual_map(query, ref_unit)
    got_map = patch_anomaly_map(query, ref_unit)

    assert got_layers.shape == shape[:3]
    assert got_map.shape == (shape[0], shape[2])
    torch.testing.assert_close(got_layers.double(), want_layers, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_map.double(), want_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_map.amax(dim=-1).double(), want_fine, atol=1e-5, rtol=0)


def test_patch_residual_is_scale_invariant_and_zero_on_a_matching_patch():
    # Raw tokens: a query patch that is a scaled copy of some reference patch (any image,
    # any position) has residual 0; the others do not.
    query, refs = _random(2, 3, 9, 8, 4, seed=7)
    query[0, :, 5] = 3.7 * refs[2, :, 1]
    query[1, :, 0] = 0.01 * refs[0, :, 8]
    got = patch_residual_map(query, normalize_reference_tokens(refs))
    assert got[0, :, 5].abs().max() < 1e-6
    assert got[1, :, 0].abs().max() < 1e-6
    want = residual_loop(query, refs)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert (got[0, :, [0, 1, 2, 3, 4, 6, 7, 8]] > 1e-3).all()


@pytest.mark.parametrize("step", [1, 2, 3])
def test_chunking_splits_the_batch_and_changes_nothing(monkeypatch, step):
    batch, layers, patches, width, k = 5, 3, 9, 8, 16
    query, refs = _random(batch, layers, patches, width, k, seed=11)
    want_layers = residual_loop(query, refs)[0]
    ref_unit = normalize_reference_tokens(refs)

    per_query = layers * patches * k * patches
    monkeypatch.setattr(residual, "_MAX_SIM_ELEMENTS", step * per_query + 1)
    calls = []
    real_matmul = torch.matmul

    def spy(a, b):
        calls.append(a.shape[0] // patches)  # rows are (queries in the chunk) × patches
        return real_matmul(a, b)

    monkeypatch.setattr(residual.torch, "matmul", spy)
    got = patch_residual_map(query, ref_unit)
    monkeypatch.setattr(residual.torch, "matmul", real_matmul)

    # it did split: one product per layer for each chunk of queries
    assert calls == [min(step, batch - s) for s in range(0, batch, step) for _ in range(layers)]
    torch.testing.assert_close(got.double(), want_layers, atol=1e-5, rtol=0)
    monkeypatch.setattr(residual, "_MAX_SIM_ELEMENTS", 1 << 40)
    torch.testing.assert_close(got, patch_residual_map(query, ref_unit), atol=1e-6, rtol=0)


def test_empty_batch():
    refs = torch.randn(2, 3, 4, 8)
    out = patch_residual_map(torch.zeros(0, 3, 4, 8), normalize_reference_tokens(refs))
    assert out.shape == (0, 3, 4)


@pytest.mark.parametrize("query_shape", [(1, 2, 4, 8), (1, 3, 4, 6)])
def test_layers_or_width_mismatch_is_refused(query_shape):
    ref_unit = normalize_reference_tokens(torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match="disagree"):
        patch_residual_map(torch.randn(*query_shape), ref_unit)


def test_normalize_reference_tokens_layout():
    refs = torch.randn(3, 2, 5, 4) * 4
    unit = normalize_reference_tokens(refs)
    assert unit.shape == (2, 3 * 5, 4)
    for l in range(2):
        for kk in range(3):
            for j in range(5):
                want = refs[kk, l, j] / refs[kk, l, j].norm()
                torch.testing.assert_close(unit[l, kk * 5 + j], want)


def test_image_residual_is_reference_mean_minus_query():
    q = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [4.0, -1.0, 0.5]])
    ref_mean = torch.tensor([1.0, 2.0, 3.0])
    want = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [-3.0, 3.0, 2.5]])
    assert torch.equal(image_residual(q, ref_mean), want)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_text_prior_hand_computed():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [normal, anomalous], unit rows
    e = torch.tensor([[3.0, 4.0], [0.8, 0.6], [0.1, 0.1], [7.0, 0.0]])
    # cos with normal / anomalous: (0.6, 0.8), (0.8, 0.6), (a, a), (1, 0)
    want = [
        math.exp(80) / (math.exp(60) + math.exp(80)),
        math.exp(60) / (math.exp(60) + math.exp(80)),
        0.5,
        math.exp(0) / (math.exp(100) + math.exp(0)),
    ]
    got = text_prior(e, t)
    assert got.shape == (4,)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64),
                               atol=1e-7, rtol=1e-5)


def test_text_prior_matches_softmax_of_cosines_loop():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(6, 16, generator=g) * 5
    t = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    # Make cosines close enough that the softmax is not saturated.
    t[1] = F.normalize(t[0] + 0.05 * torch.randn(16, generator=g), dim=0)
    got = text_prior(e, t)
    for b in range(6):
        ev = e[b].tolist()
        cn = sum(x * y for x, y in zip(ev, t[0].tolist())) / math.sqrt(sum(x * x for x in ev))
        ca = sum(x * y for x, y in zip(ev, t[1].tolist())) / math.sqrt(sum(x * x for x in ev))
        want = math.exp(100 * ca) / (math.exp(100 * cn) + math.exp(100 * ca))
        assert got[b].item() == pytest.approx(want, abs=1e-5)
    assert 1e-3 < got.min() and got.max() < 1 - 1e-3  # not trivially saturated


# ------------------------------------------------- the exact bf16-product path (bf16 runs)
#
# Tokens of a bf16 image tower are bfloat16 values held in float32. Reference: the same
# residual, min_j ½(1 − cos), from the paper's definition in float64 (``residual_loop`` for
# small shapes; the float64 cosine matrix for ViT-B-16-plus-240's real shape).

needs_bf16_units = pytest.mark.skipif(
    not residual.exact_bf16_products_available(torch.device("cpu")),
    reason="the exact bf16-product path needs a CPU with bf16 units (avx512_bf16 / amx)")


def _bf16_valued(*tensors):
    return [t.to(torch.bfloat16).float() for t in tensors]


def _spy_bf16_blocks(monkeypatch):
    entered = []
    real = residual._bf16_float32_products

    def spy():
        entered.append(1)
        return real()

    monkeypatch.setattr(residual, "_bf16_float32_products", spy)
    return entered


@needs_bf16_units
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-P{}-W{}-k{}".format(*s))
def test_bf16_valued_tokens_take_the_exact_path_and_equal_the_paper_loop(monkeypatch, shape):
    query, refs = _bf16_valued(*_random(*shape, seed=sum(shape) + 1))
    rows = residual.bf16_reference_rows(refs)
    assert rows is not None and rows.raw.dtype == torch.bfloat16
    entered = _spy_bf16_blocks(monkeypatch)
    got = patch_residual_map(query, normalize_reference_tokens(refs), rows)
    assert entered, "bf16-valued queries against bf16 rows must take the bf16-product path"
    want_layers, want_map, _ = residual_loop(query, refs)
    torch.testing.assert_close(got.double(), want_layers, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        patch_anomaly_map(query, normalize_reference_tokens(refs), rows).double(), want_map,
        atol=1e-6, rtol=0)


@needs_bf16_units
def test_bf16_path_at_the_real_shape_is_float32_accurate():
    # ViT-B-16-plus-240: 3 layers, 225 patches, width 896; k = 4; magnitudes like its
    # tokens'. Products summed in bf16 would be off by ~1e-2 here; float32 sums by ~1e-7.
    g = torch.Generator().manual_seed(3)
    query, refs = _bf16_valued(torch.randn(2, 3, 225, 896, generator=g) * 3 + 0.5,
                               torch.randn(4, 3, 225, 896, generator=g) * 3 + 0.5)
    query[1, 2, 17] = refs[3, 2, 100] * 2  # a scaled copy: residual 0 there
    ref_unit = normalize_reference_tokens(refs)
    got = patch_residual_map(query, ref_unit, residual.bf16_reference_rows(refs))
    q64 = F.normalize(query.double(), dim=-1)
    r64 = F.normalize(refs.double().permute(1, 0, 2, 3).reshape(3, 900, 896), dim=-1)
    want = torch.stack([0.5 * (1 - (q64[:, l] @ r64[l].T).amax(dim=-1)) for l in range(3)],
                       dim=1)
    torch.testing.assert_close(got.double(), want, atol=2e-7, rtol=0)
    assert got[1, 2, 17].abs() < 1e-6
    # as close to float64 as the float32 path itself
    fp32_err = (patch_residual_map(query, ref_unit).double() - want).abs().max()
    assert (got.double() - want).abs().max() <= 2 * fp32_err + 1e-7


def test_float32_tokens_never_take_the_bf16_path(monkeypatch):
    # an fp32 run: references are not bf16 values, so no rows; and a bf16-row set with
    # fp32 queries falls back. Both give the float32 path's bits exactly.
    query, refs = _random(3, 3, 9, 8, 4, seed=5)
    assert residual.bf16_reference_rows(refs) is None
    entered = _spy_bf16_blocks(monkeypatch)
    ref_unit = normalize_reference_tokens(refs)
    want = patch_residual_map(query, ref_unit)
    assert torch.equal(patch_residual_map(query, ref_unit, None), want)
    bf16_refs = _bf16_valued(refs)[0]
    rows = residual.Bf16Rows(bf16_refs.permute(1, 0, 2, 3).reshape(3, 36, 8).bfloat16(),
                             torch.ones(3, 36))
    bf16_unit = normalize_reference_tokens(bf16_refs)
    assert torch.equal(patch_residual_map(query, bf16_unit, rows),
                       patch_residual_map(query, bf16_unit))
    assert not entered


def test_no_bf16_rows_without_bf16_units(monkeypatch):
    monkeypatch.setattr(residual, "exact_bf16_products_available", lambda device: False)
    refs = _bf16_valued(torch.randn(2, 3, 4, 8))[0]
    assert residual.bf16_reference_rows(refs) is None


def test_all_bf16_values_reads_the_low_bits():
    assert residual.all_bf16_values(torch.tensor([1.0, -2.5, 0.0, 2.0 ** 127, 1.0 + 2 ** -7]))
    assert not residual.all_bf16_values(torch.tensor([1.0, 1.0 + 2 ** -8]))  # 9 bits
    assert not residual.all_bf16_values(torch.tensor([1.0], dtype=torch.float64))
    x = torch.randn(4, 6).bfloat16().float()
    assert residual.all_bf16_values(x.T)  # not contiguous
    x[3, 5] += 2 ** -20
    assert not residual.all_bf16_values(x.T)
    assert residual.all_bf16_values(torch.tensor(0.5)) and not residual.all_bf16_values(
        torch.tensor(0.1))  # 0-d
    assert residual.all_bf16_values(torch.zeros(0, 3))


@needs_bf16_units
def test_bf16_block_restores_the_matmul_precision_after_an_error():
    mm = torch.backends.mkldnn.matmul
    before = mm.fp32_precision
    with pytest.raises(RuntimeError):
        with residual._bf16_float32_products():
            assert mm.fp32_precision == "bf16"
            raise RuntimeError("boom")
    assert mm.fp32_precision == before


def test_mismatched_bf16_rows_are_refused():
    refs = _bf16_valued(torch.randn(2, 3, 4, 8))[0]
    rows = residual.Bf16Rows(torch.zeros(3, 4, 8, dtype=torch.bfloat16), torch.ones(3, 4))
    with pytest.raises(ValueError, match="not the references"):
        patch_residual_map(torch.randn(1, 3, 4, 8), normalize_reference_tokens(refs), rows)
