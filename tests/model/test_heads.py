"""pipeline.model.heads: adapter and score heads against formulas written out by hand."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.heads import Adapter, InCTRLHeads, ScoreHead


def test_adapter_formula():
    torch.manual_seed(0)
    a = Adapter(16)
    assert a.down.weight.shape == (4, 16) and a.up.weight.shape == (16, 4)
    assert a.down.bias is None and a.up.bias is None
    x = torch.randn(5, 16)
    want = torch.relu(torch.relu(x @ a.down.weight.T) @ a.up.weight.T)
    torch.testing.assert_close(a(x), want)


def test_adapter_needs_divisible_width():
    with pytest.raises(ValueError, match="divisible"):
        Adapter(18)


def test_score_head_formula_in_eval_mode():
    torch.manual_seed(1)
    h = ScoreHead(10)
    for bn in (h.bn1, h.bn2):  # non-trivial running statistics and affine parameters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    h.eval()
    x = torch.randn(7, 10)

    def bn(m, v):
        return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    v = bn(h.bn1, torch.relu(x @ h.fc1.weight.T + h.fc1.bias))
    v = bn(h.bn2, torch.relu(v @ h.fc2.weight.T + h.fc2.bias))
    logits = (v @ h.fc3.weight.T + h.fc3.bias)[:, 0]
    torch.testing.assert_close(h.logits(x), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h(x), torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
    assert h(x).shape == (7,)


def test_heads_layout():
    heads = InCTRLHeads(32, 64)
    assert heads.image_head.fc1.in_features == 32
    assert heads.holistic_head.fc1.in_features == 64
    assert heads.adapter.down.in_features == 32


def test_seeded_heads_are_reproducible():
    a, b, c = InCTRLHeads.seeded(32, 64, 5), InCTRLHeads.seeded(32, 64, 5), InCTRLHeads.seeded(32, 64, 6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["adapter.down.weight"], sc["adapter.down.weight"])
    # Seeding does not disturb the global generator.
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    InCTRLHeads.seeded(32, 64, 5)
    assert torch.equal(torch.rand(3), want)
