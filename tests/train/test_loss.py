"""The focal loss: the formula on hand-sized values, and the stable logit forms against it."""
from __future__ import annotations

import math

import torch

from pipeline.train.loss import focal_loss, focal_loss_final, focal_loss_sigmoid


def test_focal_loss_matches_the_formula_by_hand():
    p = torch.tensor([0.9, 0.2, 0.6, 0.3], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 0])
    # p_t = [0.9, 0.2, 0.4, 0.7]; FL = -(1 - p_t)^2 log p_t, alpha 1, mean over the batch.
    expected = sum(-(1 - pt) ** 2 * math.log(pt) for pt in (0.9, 0.2, 0.4, 0.7)) / 4
    assert math.isclose(focal_loss(p, y).item(), expected, rel_tol=1e-12)


def test_gamma_zero_is_binary_cross_entropy():
    p = torch.tensor([0.9, 0.2, 0.6, 0.3], dtype=torch.float64)
    y = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy(p, y)
    assert torch.allclose(focal_loss(p, y, gamma=0.0), bce)


def test_sigmoid_form_is_the_focal_loss_of_the_probability():
    z = torch.linspace(-6, 6, 13, dtype=torch.float64)
    y = (torch.arange(13) % 2).to(torch.float64)
    assert torch.allclose(focal_loss_sigmoid(z, y), focal_loss(torch.sigmoid(z), y))
    # Not the with-logits form fed with probabilities, which squashes the score twice.
    double_sigmoid = focal_loss(torch.sigmoid(torch.sigmoid(z)), y)
    assert not torch.allclose(focal_loss_sigmoid(z, y), double_sigmoid)


def test_final_form_is_the_focal_loss_of_the_averaged_score():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, generator=g, dtype=torch.float64) * 4
    fine = torch.rand(32, generator=g, dtype=torch.float64)
    y = (torch.rand(32, generator=g) > 0.5).to(torch.float64)
    p = 0.5 * (torch.sigmoid(h) + fine)
    assert torch.allclose(focal_loss_final(h, fine, y), focal_loss(p, y))


def test_stable_forms_stay_finite_where_probabilities_saturate():
    z = torch.tensor([-200.0, 200.0, -200.0, 200.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    naive = focal_loss(torch.sigmoid(z), y)
    assert not torch.isfinite(naive)
    loss = focal_loss_sigmoid(z, y) + focal_loss_final(z, torch.tensor([0.0, 1.0, 0.0, 1.0]), y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # A confidently wrong prediction costs about |z| (log σ(-200) = -200), right ones nothing.
    assert math.isclose(focal_loss_sigmoid(z.detach()[:1], y[:1]).item(), 200.0, rel_tol=1e-4)
    assert focal_loss_sigmoid(z.detach()[2:], y[2:]).item() == 0.0


def test_loss_decreases_towards_the_right_label():
    y = torch.tensor([1.0])
    fine = torch.tensor([0.3])
    losses = [focal_loss_final(torch.tensor([h]), fine, y).item() for h in (-4.0, 0.0, 4.0)]
    assert losses[0] > losses[1] > losses[2]
