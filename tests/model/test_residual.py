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
