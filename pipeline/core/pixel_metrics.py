"""Pixel-level metrics of anomaly maps against ground-truth masks: pixel AUROC, AUPRO, pixel
AUPR and pixel F1-max.

Both metrics rank every pixel of a category's test set, so a dataset would need all its
maps in memory at once. Instead each map becomes a :class:`PixelStats` of sparse
histograms, which merge exactly in any order (a Beam ``CombineFn`` accumulator): values
are quantised to bfloat16 precision first, the top 16 bits of their float32 pattern. That
grid is monotone and the same for every image and run, so histograms merge without
knowing a value range, and it has at most 65 536 points, so a histogram stays small
however many pixels it counts. Ranking quantised values ties pixels closer than about
0.4 % relative, which moves either metric by much less than seed-to-seed noise.

The metrics follow the usual definitions. Pixel AUROC is sklearn's ``roc_auc_score``
of the pixels (ties ranked as sklearn does: the trapezoid over the ROC steps). AUPRO is
MVTec AD's (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021): every
8-connected component of a mask is one region; at threshold ``t`` the per-region overlap
``PRO(t)`` is the mean over regions of the share of the region's pixels scoring
``>= t``, and the false-positive rate ``FPR(t)`` is the share of normal pixels (outside
every mask, normal images included) scoring ``>= t``; the area under ``PRO`` over
``FPR`` from 0 to ``max_fpr`` is divided by ``max_fpr``. Pixel AUPR is sklearn's
``average_precision_score`` of the pixels (the step sum of precision over recall
increments, one step per distinct value) and pixel F1-max the largest F1 over those
thresholds (``precision_recall_curve``'s points): the headline pixel metrics of recent
industrial benchmarks beside AUROC and AUPRO.

Pure numpy (and scipy's labelling, which comes with scikit-learn); :func:`read_mask` is
the one I/O edge.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import fsspec
import numpy as np
from PIL import Image
from scipy import ndimage

LOG = logging.getLogger(__name__)

#: A sparse histogram: (sorted distinct quantised values, float32 (n,); their counts, int64 (n,)).
Histogram = tuple[np.ndarray, np.ndarray]

#: MVTec AD integrates the PRO curve up to this false-positive rate.
DEFAULT_MAX_FPR = 0.3

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# PIL modes whose pixel values np.asarray reads as they are (others are converted to RGB).
_PLAIN_MODES = frozenset({"1", "L", "I", "I;16", "F", "RGB"})


class MaskError(ValueError):
    """A ground-truth mask cannot be used: unreadable, or not the image's size."""

    @property
    def reason(self) -> str:
        """What is wrong, in words (what an error row reports)."""
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------
# Quantisation and sparse histograms
# --------------------------------------------------------------------------------------------


def quantize(values: np.ndarray) -> np.ndarray:
    """``values`` as float32 truncated to bfloat16 precision, same shape, dtype float32.

    Keeps the sign, the exponent and the top 7 mantissa bits of each float32 (its top
    16 bits): a monotone non-decreasing map (truncation towards zero), so the order of
    values is kept up to ties. ``-0.0`` becomes ``0.0`` so that zero has one bin.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    truncated = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    return truncated + np.float32(0.0)  # IEEE: -0.0 + 0.0 == +0.0


def _empty_histogram() -> Histogram:
    return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)


def _histogram(quantized: np.ndarray) -> Histogram:
    """Sparse histogram of already quantised values (any shape)."""
    values, counts = np.unique(quantized.ravel(), return_counts=True)
    return values.astype(np.float32, copy=False), counts.astype(np.int64, copy=False)


def _merge_histograms(*hists: Histogram) -> Histogram:
    """The histogram of the union of the histograms' pixels."""
    values = np.concatenate([h[0] for h in hists])
    counts = np.concatenate([h[1] for h in hists])
    if values.size == 0:
        return _empty_histogram()
    merged, inverse = np.unique(values, return_inverse=True)
    total = np.zeros(merged.size, dtype=np.int64)
    np.add.at(total, inverse.ravel(), counts)
    return merged.astype(np.float32, copy=False), total


def _histograms_equal(a: Histogram, b: Histogram) -> bool:
    return (a[0].dtype == b[0].dtype and a[1].dtype == b[1].dtype
            and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


def _region_key(h: Histogram) -> tuple[int, bytes, bytes]:
    """A total order on region histograms (for comparing region multisets)."""
    return int(h[1].sum()), h[0].tobytes(), h[1].tobytes()


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PixelStats:
    """Mergeable pixel statistics of a set of anomaly maps and their masks.

    Attributes:
        normal: histogram of the pixels outside the masks, over all images (normal
            images included).
        anomalous: histogram of the pixels inside the masks.
        regions: one histogram per 8-connected component of each image's mask. They are
            a multiset: the list order follows the order of merging and means nothing;
            equality ignores it.
        images: how many maps went in.
    """

    normal: Histogram
    anomalous: Histogram
    regions: list[Histogram]
    images: int

    @classmethod
    def empty(cls) -> "PixelStats":
        """Statistics of no image: the identity of :func:`merge_stats`."""
        return cls(_empty_histogram(), _empty_histogram(), [], 0)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, PixelStats):
            return NotImplemented
        if (self.images != other.images or len(self.regions) != len(other.regions)
                or not _histograms_equal(self.normal, other.normal)
                or not _histograms_equal(self.anomalous, other.anomalous)):
            return False
        mine = sorted(self.regions, key=_region_key)
        theirs = sorted(other.regions, key=_region_key)
        return all(_histograms_equal(a, b) for a, b in zip(mine, theirs))

    __hash__ = None  # mutable arrays inside: not hashable


def _region_histograms(quantized: np.ndarray, mask: np.ndarray) -> list[Histogram]:
    """One histogram per 8-connected component of ``mask`` (H, W), of ``quantized`` (H, W)."""
    labels, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n_regions == 0:
        return []
    inside = labels > 0
    region, value = labels[inside], quantized[inside]
    order = np.lexsort((value, region))  # by region, then by value
    region, value = region[order], value[order]
    # A run of equal (region, value) pairs is one histogram bin.
    starts = np.flatnonzero(np.r_[True, (region[1:] != region[:-1]) | (value[1:] != value[:-1])])
    counts = np.diff(np.r_[starts, region.size]).astype(np.int64)
    bin_region, bin_value = region[starts], value[starts].astype(np.float32)
    # Bins of region r are the slice between the first bins of regions r and r + 1.
    bounds = np.searchsorted(bin_region, np.arange(1, n_regions + 2))
    return [(bin_value[lo:hi].copy(), counts[lo:hi].copy())
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def pixel_stats(amap: np.ndarray, mask: np.ndarray | None) -> PixelStats:
    """The statistics of one anomaly map against its ground-truth mask.

    Args:
        amap: (H, W) anomaly map at the image's resolution, higher = more anomalous;
            cast to float32, then quantised (:func:`quantize`).
        mask: (H, W) bool, True on defective pixels; None (a normal image, or one
            without a mask) counts every pixel as normal.

    Raises:
        ValueError: ``amap`` is not 2-D, has NaN values, or ``mask`` has another shape.
    """
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"an anomaly map must be (H, W), got shape {amap.shape}")
    quantized = quantize(amap)
    if np.isnan(quantized).any():
        raise ValueError(f"anomaly map has {int(np.isnan(quantized).sum())} NaN values")
    if mask is None:
        return PixelStats(_histogram(quantized), _empty_histogram(), [], 1)
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape != amap.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the map's {amap.shape}")
    return PixelStats(
        normal=_histogram(quantized[~mask]),
        anomalous=_histogram(quantized[mask]),
        regions=_region_histograms(quantized, mask),
        images=1,
    )


def merge_stats(a: PixelStats, b: PixelStats) -> PixelStats:
    """The statistics of both sets of maps; associative and commutative (up to region order)."""
    return PixelStats(
        normal=_merge_histograms(a.normal, b.normal),
        anomalous=_merge_histograms(a.anomalous, b.anomalous),
        regions=[*a.regions, *b.regions],
        images=a.images + b.images,
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _counts_at_least(hist: Histogram, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold of ``thresholds`` (ascending, (T,)), how many of the histogram's
    pixels are >= it, (T,) int64."""
    values, counts = hist
    at_least = np.concatenate([np.cumsum(counts[::-1])[::-1], [0]])  # sum(counts[i:])
    return at_least[np.searchsorted(values, thresholds, side="left")]


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Area under the polyline through (x, y), x non-decreasing (numpy < 2 lacks trapezoid)."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def pixel_auroc(stats: PixelStats) -> float:
    """Area under the pixel ROC curve of anomalous (in-mask) against normal pixels.

    The ROC has a point per distinct quantised value ``t`` (every pixel ``>= t``
    predicted anomalous) and the area is the trapezoid rule over them, as sklearn's
    ``roc_auc_score``: a tie between an anomalous and a normal pixel counts one half.
    NaN when either class has no pixel.
    """
    n_normal, n_anomalous = int(stats.normal[1].sum()), int(stats.anomalous[1].sum())
    if n_normal == 0 or n_anomalous == 0:
        return math.nan
    thresholds = np.union1d(stats.normal[0], stats.anomalous[0])  # ascending
    # Reversed: from the highest threshold down, both rates non-decreasing.
    tpr = _counts_at_least(stats.anomalous, thresholds)[::-1] / n_anomalous
    fpr = _counts_at_least(stats.normal, thresholds)[::-1] / n_normal
    return _trapezoid(np.r_[0.0, tpr], np.r_[0.0, fpr])


def _precision_recall(stats: PixelStats) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision and recall at every distinct quantised value ``t`` (pixels ``>= t``
    predicted defective), from the highest threshold down, each (T,); None when either
    class has no pixel."""
    n_normal, n_anomalous = int(stats.normal[1].sum()), int(stats.anomalous[1].sum())
    if n_normal == 0 or n_anomalous == 0:
        return None
    thresholds = np.union1d(stats.normal[0], stats.anomalous[0])[::-1]  # descending
    tp = _counts_at_least(stats.anomalous, thresholds[::-1])[::-1].astype(np.float64)
    fp = _counts_at_least(stats.normal, thresholds[::-1])[::-1].astype(np.float64)
    predicted = tp + fp  # > 0: every threshold is some pixel's value
    return tp / predicted, tp / n_anomalous


def pixel_aupr(stats: PixelStats) -> float:
    """Average precision of anomalous (in-mask) against normal pixels, as sklearn's
    ``average_precision_score``: sum over thresholds, highest first, of precision times
    the recall gained. NaN when either class has no pixel."""
    curve = _precision_recall(stats)
    if curve is None:
        return math.nan
    precision, recall = curve
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pixel_f1_max(stats: PixelStats) -> float:
    """The largest F1 = 2PR / (P + R) over the pixel thresholds (sklearn's
    ``precision_recall_curve`` points). NaN when either class has no pixel."""
    curve = _precision_recall(stats)
    if curve is None:
        return math.nan
    precision, recall = curve
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def pro_curve(stats: PixelStats) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve ``(fpr, pro)``, each (T + 1,), both non-decreasing.

    One point per distinct quantised value ``t`` of the normal and region pixels, from
    the highest down, after a first point (0, 0) for a threshold above every value.
    The result depends on the regions as a multiset, not on their order.

    Raises:
        ValueError: no region or no normal pixel.
    """
    n_normal = int(stats.normal[1].sum())
    if not stats.regions or n_normal == 0:
        raise ValueError("a PRO curve needs at least one region and one normal pixel")
    regions = sorted(stats.regions, key=_region_key)  # fixed float summation order
    thresholds = np.union1d(stats.normal[0], np.concatenate([r[0] for r in regions]))
    # PRO(t) = 1/R sum_r |{p in r : p >= t}| / |r|  =  1/R sum_{v >= t} w(v) with
    # w(v) = sum_r count_r(v) / |r|: one weighted histogram instead of R curves.
    weights = np.zeros(thresholds.size, dtype=np.float64)
    for values, counts in regions:
        np.add.at(weights, np.searchsorted(thresholds, values), counts / counts.sum())
    pro = np.minimum(np.cumsum(weights[::-1]) / len(regions), 1.0)  # rounding stays <= 1
    fpr = _counts_at_least(stats.normal, thresholds)[::-1] / n_normal
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(stats: PixelStats, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` (MVTec AD's AUPRO).

    The curve (:func:`pro_curve`) is cut at ``max_fpr``, interpolating linearly
    between its points on either side, integrated by the trapezoid rule and divided
    by ``max_fpr``, so a perfect map scores 1. NaN without regions or without normal
    pixels.

    Raises:
        ValueError: ``max_fpr`` is not in (0, 1].
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if not stats.regions or int(stats.normal[1].sum()) == 0:
        return math.nan
    fpr, pro = pro_curve(stats)
    inside = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x, y = fpr[:inside], pro[:inside]
    if inside < fpr.size and x[-1] < max_fpr:
        share = (max_fpr - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        x = np.r_[x, max_fpr]
        y = np.r_[y, pro[inside - 1] + share * (pro[inside] - pro[inside - 1])]
    return _trapezoid(y, x) / max_fpr


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def read_mask(uri: str, size: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask at ``uri`` (local path or fsspec URL) as (H, W) bool.

    Any nonzero pixel (in any colour channel; alpha ignored) is defective. ``size`` is
    the image's (H, W); the mask must have exactly that size.

    Raises:
        MaskError: the mask cannot be opened or decoded, or its size differs.
    """
    try:
        with fsspec.open(uri, "rb") as f, Image.open(f) as image:
            image.load()
            if image.mode not in _PLAIN_MODES:
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises OSError (UnidentifiedImageError) for non-images, SyntaxError for
        # some broken headers; fsspec FileNotFoundError for missing files.
        raise MaskError(f"cannot read mask {uri}: {type(exc).__name__}: {exc}") from exc
    height, width = pixels.shape[:2]
    if (height, width) != tuple(size):
        raise MaskError(f"mask {uri} is {height}x{width} (HxW), the image is "
                        f"{size[0]}x{size[1]}")
    return pixels.any(axis=-1) if pixels.ndim == 3 else pixels != 0
