"""Decisions calibrated on normal images: conformal p-values, thresholds and defect masks.

A scorer's raw score has no unit: 0.4 may be a clear defect for one scorer and noise for
another, and a threshold tuned on labelled anomalies needs anomalies a production night does
not have. Split conformal prediction (Vovk, Gammerman & Shafer, "Algorithmic Learning in a
Random World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction",
2021, section 1) turns any score into a decision with a stated false-alarm rate from normal
images alone:

* score n normal *calibration* images exactly as the queries are scored (same references,
  never against themselves): calibration scores c_1 ... c_n;
* a query with score s gets the p-value p = (1 + #{i : c_i >= s}) / (n + 1);
* it is anomalous when p <= alpha.

If the query is normal and exchangeable with the calibration images, its rank among the
n + 1 scores is uniform, so P(p <= alpha) = floor(alpha (n + 1)) / (n + 1) <= alpha (ties
only lower it). The guarantee is *marginal*: over the draw of the calibration set and the
query together; one fixed calibration set can give a realized rate above or below alpha.
No p-value reaches alpha when n + 1 < 1 / alpha: then there is no decision.

The decision flips at the L-th largest calibration score, L = floor(alpha (n + 1)) (the
⌈(1 − alpha)(n + 1)⌉-th smallest): a query is anomalous exactly when its score is strictly
above that *decision threshold*. The pixel decision uses the same rule on each calibration
image's anomaly-map maximum: a pixel is a defect when strictly above the threshold of the
maxima, so a normal query's mask is empty with probability at least 1 − alpha (marginally).

Pure numpy and scipy; no Beam, no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, stats

#: The false-alarm rate decisions keep by default (``--false-alarm-rate``).
DEFAULT_FALSE_ALARM_RATE = 0.05

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0, 1), else ValueError."""
    value = float(alpha)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"the false-alarm rate must be in (0, 1), got {alpha!r}")
    return value


def decision_rank(n: int, alpha: float) -> int:
    """L: the largest j with j / (n + 1) <= alpha, for n calibration scores (0: no p-value
    can reach alpha). A query is anomalous when 1 + #{c >= s} <= L.

    Computed with the same floating-point comparison as ``p <= alpha``, so the decision is
    exactly ``p <= alpha`` for the p-values :func:`p_values` returns.
    """
    if n < 0:
        raise ValueError(f"n must be 0 or more, got {n}")
    alpha = check_alpha(alpha)
    rank = min(n + 1, int(math.floor(alpha * (n + 1))))
    while rank + 1 <= n + 1 and (rank + 1) / (n + 1) <= alpha:
        rank += 1
    while rank > 0 and rank / (n + 1) > alpha:
        rank -= 1
    return rank


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration scores with which a p-value can reach ``alpha``: 19 for 0.05,
    99 for 0.01 (n + 1 >= 1 / alpha)."""
    n = max(0, math.ceil(1.0 / check_alpha(alpha)) - 2)
    while decision_rank(n, alpha) == 0:
        n += 1
    return n


def p_values(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values (1 + #{c >= s}) / (n + 1) of ``scores`` (m,) against the finite
    ``calibration`` scores (n,); float64 (m,), NaN where a score is NaN."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    s = np.asarray(scores, dtype=np.float64).ravel()
    at_least = cal.size - np.searchsorted(cal, s, side="left")  # #{c >= s}
    out = (1.0 + at_least) / (cal.size + 1.0)
    return np.where(np.isnan(s), np.nan, out)


def conformal_threshold(calibration: np.ndarray, alpha: float) -> float | None:
    """The score above which (strictly) a query is anomalous at ``alpha``: the L-th largest
    of the finite ``calibration`` scores (:func:`decision_rank`), i.e. their
    ⌈(1 − alpha)(n + 1)⌉-th smallest; None when no p-value can reach alpha."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64).ravel())
    rank = decision_rank(cal.size, alpha)
    return None if rank == 0 else float(cal[cal.size - rank])


def _finite_sorted(values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    return np.sort(a[np.isfinite(a)])


@dataclass(frozen=True)
class Calibration:
    """One group's calibration: its normal images' scores and anomaly-map maxima, at alpha.

    ``scores`` (n,) and ``map_maxima`` (m,) are sorted and finite (NaN and inf are left out
    by :meth:`of`); ``map_maxima`` is empty for scorers without maps, or when the run
    computes no maps.
    """

    alpha: float
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    map_maxima: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def of(cls, alpha: float, scores: Any = (), map_maxima: Any = ()) -> "Calibration":
        return cls(check_alpha(alpha), _finite_sorted(scores), _finite_sorted(map_maxima))

    @property
    def size(self) -> int:
        return int(self.scores.size)

    @property
    def reachable(self) -> bool:
        """Whether a p-value can reach alpha (n + 1 >= 1 / alpha)."""
        return decision_rank(self.size, self.alpha) > 0

    @property
    def threshold(self) -> float | None:
        return conformal_threshold(self.scores, self.alpha)

    @property
    def pixel_threshold(self) -> float | None:
        """The map value above which a pixel is a defect (None: no maps, or too few)."""
        return conformal_threshold(self.map_maxima, self.alpha) if self.map_maxima.size else None

    def decide(self, score: float | None) -> dict[str, Any]:
        """The decision columns of one query score: ``anomaly_p_value`` (None without
        calibration or score), ``is_anomalous`` (None when alpha is out of reach),
        ``calibration_size``, ``decision_threshold``, ``false_alarm_rate``."""
        n, threshold = self.size, self.threshold
        value = math.nan if score is None else float(score)
        p = None
        if n and not math.isnan(value):
            p = float(p_values(self.scores, np.array([value]))[0])
        flagged = None
        if p is not None and threshold is not None:
            flagged = bool(p <= self.alpha)
        return {"anomaly_p_value": p, "is_anomalous": flagged, "calibration_size": n,
                "decision_threshold": threshold, "false_alarm_rate": self.alpha}


def decision_note(n: int, alpha: float) -> str | None:
    """Why a group with ``n`` calibration images has no decision at ``alpha``, or None."""
    if decision_rank(n, alpha) > 0:
        return None
    need = min_calibration_size(alpha)
    if n == 0:
        return (f"no calibration image: no decision (false-alarm rate {alpha:g} needs at "
                f"least {need} normal images)")
    return (f"{n} calibration image(s): no p-value can reach {alpha:g} (n + 1 < 1/alpha); "
            f"at least {need} normal images needed, {need - n} more")


# --------------------------------------------------------------------------------------------
# Pixel decisions
# --------------------------------------------------------------------------------------------


def defect_mask(amap: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: the pixels of the anomaly map strictly above ``threshold``."""
    a = np.asarray(amap)
    if a.ndim != 2:
        raise ValueError(f"an anomaly map must be (H, W), got shape {a.shape}")
    return a > threshold


def defect_regions(mask: np.ndarray) -> int:
    """The number of 8-connected components of a (H, W) bool mask (as AUPRO's regions)."""
    _, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
    return int(count)


# --------------------------------------------------------------------------------------------
# Realized rates
# --------------------------------------------------------------------------------------------


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
    """The exact (Clopper–Pearson) two-sided confidence interval of a binomial proportion;
    (nan, nan) without trials."""
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(tail, successes,
                                                         trials - successes + 1))
    hi = 1.0 if successes == trials else float(stats.beta.ppf(1.0 - tail, successes + 1,
                                                              trials - successes))
    return lo, hi
