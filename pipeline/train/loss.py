"""Binary focal loss on probabilities, computed stably from log-probabilities.

InCTRL trains with the focal loss FL(p, y) = -α (1 - p_t)^γ log p_t, where p is the predicted
probability that an image is anomalous and p_t = p for an anomaly, 1 - p for a normal image,
with α = 1 and γ = 2, applied to the final score and to the image-residual score.

InCTRL's published code passes the heads' *sigmoid outputs* to a focal loss built on
``binary_cross_entropy_with_logits``, which applies a second sigmoid: the loss it minimises is
the focal loss of σ(p), not of p. Here the loss is the focal loss of the probability itself.
For numerical stability it is evaluated from log p and log(1 - p) written in terms of the
heads' logits (``log σ(z)``, ``logaddexp``), which is the same function of p without the
``log(0)`` a clamped probability would hit.

α multiplies both classes, as in InCTRL. (The α_t variant of Lin et al. weights the normal
class by 1 - α, which at α = 1 would ignore every normal example.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ALPHA = 1.0
GAMMA = 2.0
_LOG_HALF = math.log(0.5)


def focal_loss_from_log_probs(
    log_p: torch.Tensor, log_not_p: torch.Tensor, target: torch.Tensor,
    alpha: float = ALPHA, gamma: float = GAMMA,
) -> torch.Tensor:
    """Mean focal loss given log p and log(1 - p) of the anomalous class.

    log_p, log_not_p: (batch,) log-probabilities, each ≤ 0
    target:           (batch,) 1 for anomalous, 0 for normal
    """
    y = target.to(log_p.dtype)
    log_pt = y * log_p + (1.0 - y) * log_not_p
    modulator = (-torch.expm1(log_pt)).clamp_min(0.0).pow(gamma)  # (1 - p_t)^γ
    return (-alpha * modulator * log_pt).mean()


def focal_loss(p: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA,
               gamma: float = GAMMA) -> torch.Tensor:
    """Plain focal loss of probabilities p, straight from the formula (reference version).

    Exact while 0 < p < 1; training uses the logit forms below, which stay finite at the ends.
    """
    y = target.to(p.dtype)
    pt = y * p + (1.0 - y) * (1.0 - p)
    return (-alpha * (1.0 - pt).pow(gamma) * torch.log(pt)).mean()


def focal_loss_sigmoid(logits: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA,
                       gamma: float = GAMMA) -> torch.Tensor:
    """Focal loss of p = σ(logits): log p = log σ(z), log(1 - p) = log σ(-z)."""
    return focal_loss_from_log_probs(F.logsigmoid(logits), F.logsigmoid(-logits), target,
                                     alpha, gamma)


def focal_loss_final(holistic_logits: torch.Tensor, fine: torch.Tensor, target: torch.Tensor,
                     alpha: float = ALPHA, gamma: float = GAMMA) -> torch.Tensor:
    """Focal loss of InCTRL's final score p = (σ(h) + fine) / 2, fine in [0, 1].

    log p     = log ½ + log(σ(h) + fine)             = log ½ + logaddexp(log σ(h), log fine)
    log (1-p) = log ½ + log((1 - σ(h)) + (1 - fine)) = log ½ + logaddexp(log σ(-h), log(1-fine))
    """
    fine = fine.to(holistic_logits.dtype).clamp(0.0, 1.0)
    log_p = _LOG_HALF + torch.logaddexp(F.logsigmoid(holistic_logits), torch.log(fine))
    log_not_p = _LOG_HALF + torch.logaddexp(F.logsigmoid(-holistic_logits), torch.log1p(-fine))
    return focal_loss_from_log_probs(log_p, log_not_p, target, alpha, gamma)
