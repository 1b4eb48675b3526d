"""The numbers behind the report's plots: ROC and precision-recall curves, histogram bins.

Pure numpy / scikit-learn; the plots themselves are :mod:`pipeline.report.svg`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

#: Curves with more points are thinned to about this many (a page stays small however many
#: queries a dataset has; the curve's shape is kept to well under a pixel at plot size).
MAX_CURVE_POINTS = 400


@dataclass(frozen=True)
class Curve:
    """Points of one curve (``x``, ``y`` of equal length) and its area."""

    x: np.ndarray
    y: np.ndarray
    area: float


def labelled_pairs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (label, score) pairs with a 0/1 label and a finite score, as float arrays."""
    y = np.asarray(labels, dtype=float).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    keep = np.isfinite(y) & np.isfinite(s) & np.isin(y, (0.0, 1.0))
    return y[keep], s[keep]


def has_both_classes(labels: np.ndarray) -> bool:
    """Whether ``labels`` (0/1, NaN for unlabelled) hold at least one normal and one anomaly."""
    y = np.asarray(labels, dtype=float)
    return bool((y == 0).any() and (y == 1).any())


def thin(x: np.ndarray, y: np.ndarray, limit: int = MAX_CURVE_POINTS
         ) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``limit`` points of a curve, evenly spaced by index, first and last
    kept."""
    if len(x) <= limit:
        return x, y
    index = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
    return x[index], y[index]


def roc(labels: np.ndarray, scores: np.ndarray) -> Curve | None:
    """The ROC curve (false-positive rate → true-positive rate) and its AUROC; None unless
    both classes are present."""
    y, s = labelled_pairs(labels, scores)
    if not has_both_classes(y):
        return None
    fpr, tpr, _ = roc_curve(y, s)
    return Curve(*thin(fpr, tpr), float(auc(fpr, tpr)))


def precision_recall(labels: np.ndarray, scores: np.ndarray) -> Curve | None:
    """The precision-recall curve (recall → precision, recall ascending) and its average
    precision (the summary's AUPRC); None unless both classes are present."""
    y, s = labelled_pairs(labels, scores)
    if not has_both_classes(y):
        return None
    precision, recall, _ = precision_recall_curve(y, s)
    order = np.argsort(recall, kind="stable")
    return Curve(*thin(recall[order], precision[order]), float(average_precision_score(y, s)))


def bin_edges(values: np.ndarray, max_bins: int = 30) -> np.ndarray:
    """Shared histogram bin edges for ``values`` (finite ones): about √n bins, 5 to
    ``max_bins``; a single value gets one bin around it."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.array([0.0, 1.0])
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        return np.array([lo - pad, hi + pad])
    bins = int(min(max_bins, max(5, round(np.sqrt(v.size)))))
    return np.linspace(lo, hi, bins + 1)


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The fraction of ``values`` (finite ones) in each bin of ``edges``; zeros when there
    is none. Fractions, not counts, so a few anomalies read beside many normals."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    counts, _ = np.histogram(v, bins=edges)
    return counts / v.size if v.size else counts.astype(float)
