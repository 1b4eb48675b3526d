"""Tests for pipeline.core.calibration: conformal p-values, the decision threshold, the
false-alarm guarantee, defect masks and the binomial interval.

References: the conformal p-value p = (1 + #{i : c_i >= s}) / (n + 1) and its validity
P(p <= alpha) = floor(alpha (n + 1)) / (n + 1) <= alpha for exchangeable normal scores are
Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random World" (2005), and Angelopoulos
& Bates, "A Gentle Introduction to Conformal Prediction and Distribution-Free Uncertainty
Quantification" (2021), section 1 (the ⌈(n + 1)(1 − alpha)⌉ / n quantile) and appendix on
conformal p-values. The Clopper–Pearson interval is checked against scipy's ``binomtest``.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from pipeline.core import calibration as cal


def p_value_by_loop(calibration: list[float], score: float) -> float:
    """The definition, one calibration score at a time."""
    at_least = 0
    for c in calibration:
        if c >= score:
            at_least += 1
    return (1 + at_least) / (len(calibration) + 1)


# ---------------------------------------------------------------- p-values and thresholds


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
def test_p_values_follow_the_definition(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    calib = rng.normal(size=30)
    scores = np.r_[rng.normal(size=40), calib[:5], calib.max() + 1, calib.min() - 1]
    if ties:
        calib, scores = np.round(calib), np.round(scores)
    got = cal.p_values(calib, scores)
    assert got.tolist() == [p_value_by_loop(calib.tolist(), s) for s in scores]
    assert got[-2] == 1 / 31 and got[-1] == 1.0


def test_p_value_of_a_nan_score_is_nan_and_no_calibration_gives_one() -> None:
    assert np.isnan(cal.p_values([1.0, 2.0], [math.nan])[0])
    assert cal.p_values([], [3.0]).tolist() == [1.0]


@pytest.mark.parametrize("alpha,n", [(0.05, 19), (0.01, 99), (0.1, 9), (0.5, 1), (0.2, 4),
                                     (0.03, 33), (0.3, 3)])
def test_min_calibration_size_is_where_one_over_n_plus_one_reaches_alpha(alpha, n) -> None:
    # n + 1 >= 1 / alpha: the smallest p-value 1 / (n + 1) is then <= alpha.
    assert cal.min_calibration_size(alpha) == n
    assert cal.decision_rank(n, alpha) == 1
    assert cal.decision_rank(n - 1, alpha) == 0


def test_decision_rank_is_floor_of_alpha_n_plus_one() -> None:
    for alpha in (0.01, 0.05, 0.1, 0.25):
        for n in range(0, 300, 7):
            rank = cal.decision_rank(n, alpha)
            assert rank / (n + 1) <= alpha < (rank + 1) / (n + 1)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_alpha_out_of_range_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="false-alarm rate"):
        cal.check_alpha(bad)
    with pytest.raises(ValueError):
        cal.Calibration.of(bad, [1.0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_decision_flips_strictly_above_the_threshold(seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    calib = np.round(rng.normal(size=int(rng.integers(19, 80))), 1)  # ties on purpose
    c = cal.Calibration.of(alpha, calib)
    threshold = c.threshold
    # The ⌈(1 − alpha)(n + 1)⌉-th smallest calibration score (in exact arithmetic).
    position = math.ceil((1 - Fraction(str(alpha))) * (c.size + 1))
    assert threshold == np.sort(calib)[position - 1]
    for s in np.r_[np.round(rng.normal(size=200), 1), calib]:
        decided = c.decide(float(s))
        assert decided["is_anomalous"] == (decided["anomaly_p_value"] <= alpha)
        assert decided["is_anomalous"] == (s > threshold)
        assert decided["decision_threshold"] == threshold
        assert decided["calibration_size"] == c.size and decided["false_alarm_rate"] == alpha


def test_too_few_or_no_calibration_scores_give_no_decision() -> None:
    few = cal.Calibration.of(0.05, np.arange(18.0))
    decided = few.decide(100.0)
    assert decided["anomaly_p_value"] == 1 / 19 and decided["is_anomalous"] is None
    assert decided["decision_threshold"] is None and not few.reachable
    assert "18 calibration image(s)" in cal.decision_note(18, 0.05)
    assert "at least 19" in cal.decision_note(18, 0.05) and "1 more" in cal.decision_note(18, 0.05)
    empty = cal.Calibration.of(0.05).decide(1.0)
    assert empty["anomaly_p_value"] is None and empty["is_anomalous"] is None
    assert empty["calibration_size"] == 0
    assert "no calibration image" in cal.decision_note(0, 0.05)
    assert cal.decision_note(19, 0.05) is None
    assert cal.Calibration.of(0.05, np.arange(19.0)).decide(None)["is_anomalous"] is None


def test_non_finite_calibration_scores_are_left_out() -> None:
    c = cal.Calibration.of(0.1, [1.0, math.nan, 2.0, math.inf, 3.0], [math.nan, 5.0])
    assert c.scores.tolist() == [1.0, 2.0, 3.0] and c.map_maxima.tolist() == [5.0]


def test_pixel_threshold_uses_the_same_rule_on_the_map_maxima() -> None:
    maxima = np.arange(1.0, 21.0)  # 20 maxima: alpha 0.05 → L = 1, the largest
    c = cal.Calibration.of(0.05, np.arange(20.0), maxima)
    assert c.pixel_threshold == 20.0
    assert cal.Calibration.of(0.05, np.arange(20.0)).pixel_threshold is None
    assert cal.Calibration.of(0.05, np.arange(20.0), maxima[:5]).pixel_threshold is None


# ---------------------------------------------------------------- the false-alarm guarantee


def _realized_false_alarms(n: int, alpha: float, trials: int, rng: np.random.Generator,
                           draw, decide) -> int:
    """Trials with a fresh exchangeable calibration set and one normal query each; how many
    queries were flagged."""
    flagged = 0
    for _ in range(trials):
        scores = draw(rng, n + 1)
        flagged += bool(decide(scores[:n], float(scores[n])))
    return flagged


def _ours(alpha):
    return lambda calib, s: cal.Calibration.of(alpha, calib).decide(s)["is_anomalous"]


CASES = [(19, 0.05), (40, 0.05), (99, 0.01), (9, 0.1), (20, 0.1), (57, 0.2)]
TRIALS = 12000
#: One-sided tail probability of the binomial tolerance: a valid method fails once in 10⁶.
TAIL = 1e-6


@pytest.mark.parametrize("n,alpha", CASES)
def test_false_alarm_rate_stays_at_or_below_alpha(n: int, alpha: float) -> None:
    rng = np.random.default_rng(n * 1000 + int(alpha * 1000))
    count = _realized_false_alarms(n, alpha, TRIALS, rng, lambda r, m: r.normal(size=m),
                                   _ours(alpha))
    # At or below alpha within the binomial tolerance of TRIALS Bernoulli(alpha) trials ...
    assert count <= stats.binom.ppf(1 - TAIL, TRIALS, alpha), (count / TRIALS, alpha)
    # ... and not trivially: the exact rate floor(alpha (n + 1)) / (n + 1) is reached.
    exact = cal.decision_rank(n, alpha) / (n + 1)
    assert count >= stats.binom.ppf(TAIL, TRIALS, exact), (count / TRIALS, exact)


@pytest.mark.parametrize("n,alpha", [(19, 0.05), (30, 0.1)])
def test_ties_only_make_the_decision_more_conservative(n: int, alpha: float) -> None:
    rng = np.random.default_rng(7)
    count = _realized_false_alarms(n, alpha, TRIALS, rng,
                                   lambda r, m: r.integers(0, 4, size=m).astype(float),
                                   _ours(alpha))
    assert count <= stats.binom.ppf(1 - TAIL, TRIALS, alpha)


def test_the_tolerance_catches_a_p_value_without_its_plus_one() -> None:
    # #{c >= s} / n (no +1) flags too often: at n = 20, alpha = 0.1 it flags when at most 2
    # calibration scores are >= s, a rate of 3/21 = 0.143. The check above must fail on it.
    n, alpha = 20, 0.1

    def naive(calib, s):
        return (np.asarray(calib) >= s).sum() / n <= alpha

    count = _realized_false_alarms(n, alpha, TRIALS, np.random.default_rng(3),
                                   lambda r, m: r.normal(size=m), naive)
    assert count > stats.binom.ppf(1 - TAIL, TRIALS, alpha)


# ---------------------------------------------------------------- pixels and intervals


def test_defect_mask_is_strictly_above_and_regions_are_eight_connected() -> None:
    amap = np.array([[0.0, 2.0, 0.0, 0.0],
                     [0.0, 0.0, 2.0, 0.0],
                     [1.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 3.0]])
    mask = cal.defect_mask(amap, 1.0)
    assert mask.sum() == 3 and not mask[2, 0]  # 1.0 is not above 1.0
    assert cal.defect_regions(mask) == 2  # the diagonal pair is one region, (3, 3) another
    assert cal.defect_regions(np.zeros((3, 3), bool)) == 0
    with pytest.raises(ValueError):
        cal.defect_mask(np.zeros(4), 0.0)


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (20, 20), (12, 240), (1, 1)])
def test_clopper_pearson_equals_scipys_exact_interval(k: int, n: int) -> None:
    want = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = cal.clopper_pearson(k, n)
    assert lo == pytest.approx(want.low, abs=1e-12) and hi == pytest.approx(want.high, abs=1e-12)
    assert all(math.isnan(v) for v in cal.clopper_pearson(0, 0))
    with pytest.raises(ValueError):
        cal.clopper_pearson(5, 3)
