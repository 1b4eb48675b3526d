"""Tests for pipeline.core.pixel_metrics: histograms, pixel AUROC and AUPRO against references."""
from __future__ import annotations

import functools
import io
import math
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.core import pixel_metrics as pm

# ---------------------------------------------------------------- references from the definitions


def regions_by_flood_fill(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a (H, W) bool mask, by a plain flood fill."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, region = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            region.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    nr, nc = r + dr, c + dc
                    if (0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1]
                            and mask[nr, nc] and not seen[nr, nc]):
                        seen[nr, nc] = True
                        stack.append((nr, nc))
        regions.append(region)
    return regions


def reference_aupro(maps: list[np.ndarray], masks: list[np.ndarray | None],
                    max_fpr: float = 0.3) -> float:
    """AUPRO straight from MVTec AD's definition, every distinct value a threshold."""
    q = [pm.quantize(a) for a in maps]
    normal = np.concatenate([a[~m].ravel() if m is not None else a.ravel() for a, m in zip(q, masks)])
    regions = [np.array([a[p] for p in region])
               for a, m in zip(q, masks) if m is not None for region in regions_by_flood_fill(m)]
    thresholds = sorted(set(np.concatenate([a.ravel() for a in q]).tolist()), reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        fpr = np.sum(normal >= t) / normal.size
        pro = sum(np.sum(r >= t) / r.size for r in regions) / len(regions)
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_case(seed: int, n_images: int = 4, size: int = 24, ties: bool = False):
    """Maps and masks: one normal image (mask None), the rest with 2–3 blobs each."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    maps, masks = [], []
    for i in range(n_images):
        if i == 0:
            mask = None
            amap = rng.normal(size=(size, size))
        else:
            mask = np.zeros((size, size), dtype=bool)
            for _ in range(rng.integers(2, 4)):
                r, c = rng.uniform(3, size - 3, 2)
                mask |= np.hypot(rows - r, cols - c) < rng.uniform(1.5, 4.0)
            # Regions scored unevenly: some found well, some hardly.
            amap = rng.normal(size=(size, size)) + mask * rng.uniform(0.0, 3.0)
        if ties:
            amap = np.round(amap, 1)
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return maps, masks


def stats_of(maps, masks) -> pm.PixelStats:
    return functools.reduce(pm.merge_stats, [pm.pixel_stats(a, m) for a, m in zip(maps, masks)],
                            pm.PixelStats.empty())


# ---------------------------------------------------------------- quantisation


def test_quantize_keeps_the_top_16_bits() -> None:
    values = np.array([1.0, 1 + 2**-7, 1 + 2**-8, 1 + 2**-7 + 2**-9, -3.999, 0.1], dtype=np.float32)
    q = pm.quantize(values)
    assert q.dtype == np.float32 and q.shape == values.shape
    assert q[:4].tolist() == [1.0, 1 + 2**-7, 1.0, 1 + 2**-7]
    assert (q.view(np.uint32) & 0xFFFF).max() == 0
    assert (q.view(np.uint32) == (values.view(np.uint32) & 0xFFFF0000)).all()
    assert q[4] == -3.984375  # truncation towards zero: -(2 - 2**-7) * 2
    assert abs(q[5] - 0.1) / 0.1 < 2**-7


def test_quantize_is_monotone_and_has_one_zero() -> None:
    values = np.sort(np.random.default_rng(0).normal(scale=100, size=10_000).astype(np.float32))
    assert (np.diff(pm.quantize(values)) >= 0).all()
    zeros = pm.quantize(np.array([-0.0, 0.0], dtype=np.float32))
    assert zeros.view(np.uint32).tolist() == [0, 0]
    assert pm.pixel_stats(np.array([[-0.0, 0.0]]), None).normal[1].tolist() == [2]


# ---------------------------------------------------------------- statistics


def test_pixel_stats_splits_pixels_by_mask_and_regions_by_8_connectivity() -> None:
    amap = np.arange(20, dtype=np.float32).reshape(4, 5)
    mask = np.array([[1, 0, 0, 0, 1],
                     [0, 1, 0, 0, 1],  # (0,0)-(1,1) touch diagonally: one region
                     [0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0]], dtype=bool)
    stats = pm.pixel_stats(amap, mask)

    assert stats.images == 1
    assert stats.anomalous[0].tolist() == [0, 4, 6, 9, 15, 16]
    assert stats.anomalous[1].tolist() == [1] * 6
    assert stats.normal[1].sum() == 14 and 0 not in stats.normal[0]
    assert stats.normal[0].dtype == np.float32 and stats.normal[1].dtype == np.int64
    regions = sorted(r[0].tolist() for r in stats.regions)
    assert regions == [[0, 6], [4, 9], [15, 16]]
    assert len(regions_by_flood_fill(mask)) == 3


def test_region_histograms_count_repeated_values() -> None:
    amap = np.array([[1.0, 1.0, 0.0, 2.0], [1.0, 3.0, 0.0, 2.0]], dtype=np.float32)
    mask = np.array([[1, 1, 0, 1], [1, 1, 0, 0]], dtype=bool)
    stats = pm.pixel_stats(amap, mask)
    by_size = sorted(stats.regions, key=lambda r: r[1].sum())
    assert [(r[0].tolist(), r[1].tolist()) for r in by_size] == [([2.0], [1]), ([1.0, 3.0], [3, 1])]
    assert (stats.normal[0].tolist(), stats.normal[1].tolist()) == ([0.0, 2.0], [2, 1])


def test_normal_image_has_only_normal_pixels() -> None:
    stats = pm.pixel_stats(np.ones((3, 3)), None)
    assert stats.normal[1].tolist() == [9] and stats.anomalous[0].size == 0 and stats.regions == []
    assert pm.pixel_stats(np.ones((3, 3)), np.zeros((3, 3), bool)) == stats


@pytest.mark.parametrize("amap, mask, match", [
    (np.zeros((2, 2, 1)), None, "must be"),
    (np.array([[0.0, np.nan]]), None, "NaN"),
    (np.zeros((2, 2)), np.zeros((2, 3), bool), "shape"),
])
def test_pixel_stats_rejects_bad_inputs(amap, mask, match) -> None:
    with pytest.raises(ValueError, match=match):
        pm.pixel_stats(amap, mask)


@pytest.mark.parametrize("seed", range(3))
def test_merging_in_any_order_or_split_gives_identical_stats_and_metrics(seed: int) -> None:
    maps, masks = random_case(seed, n_images=6, ties=True)
    parts = [pm.pixel_stats(a, m) for a, m in zip(maps, masks)]
    left = functools.reduce(pm.merge_stats, parts)
    right = functools.reduce(lambda acc, s: pm.merge_stats(s, acc), parts[::-1])
    tree = pm.merge_stats(pm.merge_stats(pm.merge_stats(parts[0], parts[1]), parts[2]),
                          pm.merge_stats(parts[3], pm.merge_stats(parts[4], parts[5])))
    rng = np.random.default_rng(seed)
    shuffled = functools.reduce(pm.merge_stats, [parts[i] for i in rng.permutation(6)],
                                pm.PixelStats.empty())
    for other in (right, tree, shuffled):
        assert other == left
        assert pm.pixel_auroc(other) == pm.pixel_auroc(left)
        assert pm.aupro(other) == pm.aupro(left)
    assert left.images == 6
    assert pm.merge_stats(left, pm.PixelStats.empty()) == left
    # Equality really looks at the contents.
    assert pm.merge_stats(left, parts[0]) != left
    assert left != pm.PixelStats.empty()


# ---------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_auroc_equals_sklearn_on_the_quantised_pixels(seed: int, ties: bool) -> None:
    maps, masks = random_case(seed, ties=ties)
    labels = np.concatenate([(m if m is not None else np.zeros(a.shape, bool)).ravel()
                             for a, m in zip(maps, masks)])
    values = np.concatenate([pm.quantize(a).ravel() for a in maps])
    expected = roc_auc_score(labels, values)
    assert pm.pixel_auroc(stats_of(maps, masks)) == pytest.approx(expected, rel=0, abs=1e-12)


def test_pixel_auroc_counts_ties_half() -> None:
    # Anomalous 1, 2; normal 0, 1: pairs (1>0), (1=1: half), (2>0), (2>1) → 3.5 / 4.
    stats = pm.pixel_stats(np.array([[1.0, 2.0, 0.0, 1.0]]), np.array([[1, 1, 0, 0]], bool))
    assert pm.pixel_auroc(stats) == 0.875


def test_perfect_and_inverted_maps() -> None:
    _, masks = random_case(5)
    perfect = [np.where(m, 1.0, 0.0) if m is not None else np.zeros((24, 24)) for m in masks]
    inverted = [1.0 - p for p in perfect]
    assert pm.pixel_auroc(stats_of(perfect, masks)) == 1.0
    assert pm.aupro(stats_of(perfect, masks)) == 1.0
    assert pm.pixel_auroc(stats_of(inverted, masks)) == 0.0
    assert pm.aupro(stats_of(inverted, masks)) == 0.0


def test_metrics_are_nan_without_a_class() -> None:
    no_masks = pm.pixel_stats(np.random.default_rng(0).normal(size=(4, 4)), None)
    all_defect = pm.pixel_stats(np.ones((4, 4)), np.ones((4, 4), bool))
    for stats in (no_masks, all_defect, pm.PixelStats.empty()):
        assert math.isnan(pm.pixel_auroc(stats))
        assert math.isnan(pm.aupro(stats))


# ---------------------------------------------------------------- pixel AUPR and F1-max


def _pixels(maps, masks):
    labels = np.concatenate([(m if m is not None else np.zeros(a.shape, bool)).ravel()
                             for a, m in zip(maps, masks)])
    values = np.concatenate([pm.quantize(a).ravel() for a in maps])
    return labels, values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_aupr_and_f1_max_equal_sklearn_on_the_quantised_pixels(seed: int,
                                                                     ties: bool) -> None:
    maps, masks = random_case(seed, ties=ties)
    labels, values = _pixels(maps, masks)
    stats = stats_of(maps, masks)
    assert pm.pixel_aupr(stats) == pytest.approx(average_precision_score(labels, values),
                                                 rel=0, abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, values)
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)
    assert pm.pixel_f1_max(stats) == pytest.approx(f1.max(), rel=0, abs=1e-12)


def test_pixel_aupr_and_f1_max_by_hand() -> None:
    # Anomalous 2, 1; normal 1, 0. Thresholds 2: P 1, R 1/2; 1: P 2/3, R 1; 0: P 1/2, R 1.
    stats = pm.pixel_stats(np.array([[2.0, 1.0, 1.0, 0.0]]), np.array([[1, 1, 0, 0]], bool))
    assert pm.pixel_aupr(stats) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # F1 at 2: 2·1·0.5/1.5 = 2/3; at 1: 2·(2/3)·1/(5/3) = 0.8.
    assert pm.pixel_f1_max(stats) == pytest.approx(0.8)


def test_pixel_aupr_and_f1_max_of_perfect_maps_and_without_a_class() -> None:
    _, masks = random_case(5)
    perfect = [np.where(m, 1.0, 0.0) if m is not None else np.zeros((24, 24)) for m in masks]
    assert pm.pixel_aupr(stats_of(perfect, masks)) == 1.0
    assert pm.pixel_f1_max(stats_of(perfect, masks)) == 1.0
    no_masks = pm.pixel_stats(np.random.default_rng(0).normal(size=(4, 4)), None)
    for stats in (no_masks, pm.PixelStats.empty()):
        assert math.isnan(pm.pixel_aupr(stats)) and math.isnan(pm.pixel_f1_max(stats))


# ---------------------------------------------------------------- AUPRO


def test_aupro_by_hand() -> None:
    # Normal 0, 1, 2, 3; one region 2, 3. Curve (0,0) (1/4,1/2) (1/2,1) (3/4,1) (1,1);
    # at FPR 0.3 PRO is 0.6, so the area is 1/4·1/4 + 0.05·1.1/2 = 0.09, and 0.09 / 0.3.
    stats = pm.pixel_stats(np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 3.0]]),
                           np.array([[0, 0, 0], [0, 1, 1]], bool))
    fpr, pro = pm.pro_curve(stats)
    assert fpr.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert pro.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert pm.aupro(stats) == pytest.approx(0.3)
    assert pm.aupro(stats, max_fpr=1.0) == pytest.approx((0.0625 + 0.1875 + 0.25 + 0.25))


def test_aupro_weighs_regions_equally_not_pixels() -> None:
    # A big region found, a one-pixel region missed. PRO is 1/2 while the threshold is above
    # the background, then rises linearly with FPR to 1 at FPR 1: the area up to 0.3 is
    # 0.3 · (0.5 + 0.65) / 2, so AUPRO 0.575 (weighted by pixels instead it would be ≈ 0.96).
    amap = np.zeros((10, 10))
    mask = np.zeros((10, 10), bool)
    mask[:4, :5] = True  # 20 pixels, scored 1
    amap[:4, :5] = 1.0
    mask[9, 9] = True  # 1 pixel, scored like the background
    stats = pm.pixel_stats(amap, mask)
    assert len(stats.regions) == 2
    assert pm.aupro(stats) == pytest.approx(0.575)
    assert pm.pixel_auroc(stats) > 0.95


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_equals_the_plain_loop_reference(seed: int, max_fpr: float) -> None:
    maps, masks = random_case(seed, ties=seed % 2 == 1)
    expected = reference_aupro(maps, masks, max_fpr)
    assert 0.0 < expected < 1.0
    assert pm.aupro(stats_of(maps, masks), max_fpr) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("max_fpr", [0.0, -0.1, 1.5])
def test_aupro_rejects_bad_max_fpr(max_fpr: float) -> None:
    stats = stats_of(*random_case(0))
    with pytest.raises(ValueError, match="max_fpr"):
        pm.aupro(stats, max_fpr)


# ---------------------------------------------------------------- read_mask


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(data: bytes) -> str:
    uri = f"memory://masks/{uuid.uuid4().hex}.png"
    with fsspec.open(uri, "wb") as f:
        f.write(data)
    return uri


@pytest.mark.parametrize("mode", [None, "1", "P", "RGB", "RGBA"])
def test_read_mask_nonzero_is_defect(mode: str | None) -> None:
    pixels = np.zeros((3, 4), dtype=np.uint8)
    pixels[1, 2] = 255
    pixels[2, 0] = 255
    mask = pm.read_mask(_write(_png(pixels, mode)), (3, 4))
    assert mask.dtype == bool and mask.shape == (3, 4)
    assert mask.tolist() == (pixels > 0).tolist()


def test_read_mask_any_colour_channel_counts(tmp_path) -> None:
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[0, 1, 2] = 1  # a faint blue pixel: dark in luminance, still marked
    path = tmp_path / "m.png"
    path.write_bytes(_png(pixels))
    assert pm.read_mask(str(path), (2, 2)).tolist() == [[False, True], [False, False]]


def test_read_mask_errors(tmp_path) -> None:
    good = _write(_png(np.zeros((3, 4), np.uint8)))
    with pytest.raises(pm.MaskError, match="3x4") as err:
        pm.read_mask(good, (4, 3))
    assert "4x3" in err.value.reason
    with pytest.raises(pm.MaskError, match="cannot read"):
        pm.read_mask(str(tmp_path / "missing_mask.png"), (3, 4))
    with pytest.raises(pm.MaskError, match="cannot read"):
        pm.read_mask(_write(b"not a png"), (3, 4))
    truncated = _png(np.zeros((30, 40), np.uint8))[:40]
    with pytest.raises(pm.MaskError, match="cannot read"):
        pm.read_mask(_write(truncated), (30, 40))
    assert issubclass(pm.MaskError, ValueError)
