"""Synthetic demo data in the MVTec-AD folder layout.

Lets anyone run the whole job without downloading a benchmark. Three datasets
of different character (regular textures, objects on a background, grayscale
scans) are drawn with numpy: normal images share one structure and vary only
by noise and small jitter; defect images carry one clearly visible local
anomaly, and its ground-truth mask is written beside the images as MVTec AD
does. Every image is drawn from its own seeded generator, so the same seed
always gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

LOG = logging.getLogger(__name__)

# Images are float arrays in 0..255 of shape (size, size, channels).
Array = np.ndarray
NormalFn = Callable[[np.random.Generator, int], Array]
# A defect draws into an image, centred at (row, col), in place, and returns its blend
# weights, shape (size, size) in [0, 1]: the pixels with a weight above 0 are the defect's.
DefectFn = Callable[[Array, np.random.Generator, tuple[float, float]], Array]
# Picks where a defect may go: a point on the object, not on the background.
SiteFn = Callable[[np.random.Generator, int], tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class _Category:
    normal: NormalFn
    site: SiteFn
    defects: tuple[str, ...]
    grayscale: bool = False


# --------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------


def _grid(size: int) -> tuple[Array, Array]:
    """Row and column coordinates, each of shape (size, size)."""
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _soft_disc(size: int, center: tuple[float, float], radius: float) -> Array:
    """A disc mask in [0, 1] with a one-pixel soft edge, shape (size, size)."""
    rows, cols = _grid(size)
    dist = np.hypot(rows - center[0], cols - center[1])
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _blend(image: Array, mask: Array, value: Array | float) -> None:
    """image ← image·(1−mask) + value·mask, in place; mask is (size, size)."""
    m = mask[..., None]
    image *= 1.0 - m
    image += m * value


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    image = Image.fromarray(coarse.astype(np.float32))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)


def _jitter(rng: np.random.Generator, amount: float) -> Array:
    return rng.uniform(-amount, amount, 2)


# --------------------------------------------------------------------------
# Normal images
# --------------------------------------------------------------------------


def _fabric(rng: np.random.Generator, size: int) -> Array:
    """Plain-weave cloth: alternating horizontal and vertical threads, tan colour."""
    rows, cols = _grid(size)
    period = 8.0
    dr, dc = _jitter(rng, 1.0)
    warp = np.sin(2 * np.pi * (cols + dc) / period)
    weft = np.sin(2 * np.pi * (rows + dr) / period)
    over = ((np.floor((rows + dr) / period) + np.floor((cols + dc) / period)) % 2) == 0
    thread = np.where(over, warp, weft)
    shade = 0.75 + 0.2 * thread + rng.normal(0.0, 0.03, (size, size))
    color = np.array([200.0, 165.0, 120.0])
    return np.clip(shade[..., None] * color, 0, 255)


def _metal_grid(rng: np.random.Generator, size: int) -> Array:
    """Brushed steel plate with a regular grid of dark grooves."""
    rows, cols = _grid(size)
    streaks = rng.normal(0.0, 6.0, (size, 1)) + rng.normal(0.0, 3.0, (size, size))
    base = 150.0 + streaks
    pitch = 16.0
    dr, dc = _jitter(rng, 1.0)
    groove = (np.abs(((rows + dr) % pitch) - pitch / 2) < 1.0) | (
        np.abs(((cols + dc) % pitch) - pitch / 2) < 1.0
    )
    gray = np.where(groove, base - 70.0, base)
    tint = np.array([0.97, 1.0, 1.05])
    return np.clip(gray[..., None] * tint, 0, 255)


def _washer_geometry(size: int) -> tuple[float, float]:
    return 0.36 * size, 0.16 * size  # outer, inner radius


def _washer(rng: np.random.Generator, size: int) -> Array:
    """A metal ring on a plain blue-grey background, centre jittered by ±2 px."""
    outer, inner = _washer_geometry(size)
    center = np.array([size / 2, size / 2]) + _jitter(rng, 2.0)
    rows, cols = _grid(size)
    dist = np.hypot(rows - center[0], cols - center[1])
    background = np.array([60.0, 70.0, 85.0]) + rng.normal(0.0, 3.0, (size, size, 3))
    ring = np.clip(outer + 0.5 - dist, 0, 1) * np.clip(dist - inner + 0.5, 0, 1)
    # Radial shading gives the ring a bevelled, metallic look.
    shade = 170.0 + 40.0 * np.cos(np.pi * (dist - inner) / (outer - inner))
    metal = shade[..., None] * np.array([1.0, 1.0, 1.04]) + rng.normal(0.0, 3.0, (size, size, 3))
    image = background
    _blend(image, ring, metal)
    return np.clip(image, 0, 255)


def _capsule_geometry(size: int) -> tuple[float, float]:
    return 0.36 * size, 0.15 * size  # half length, radius


def _capsule(rng: np.random.Generator, size: int) -> Array:
    """A horizontal two-tone pill (red cap, white body) on a light background."""
    half_len, radius = _capsule_geometry(size)
    center = np.array([size / 2, size / 2]) + _jitter(rng, 1.5)
    rows, cols = _grid(size)
    along = np.clip(cols - center[1], -(half_len - radius), half_len - radius)
    dist = np.hypot(rows - center[0], cols - center[1] - along)
    body = np.clip(radius + 0.5 - dist, 0, 1)
    left = (cols < center[1])[..., None]
    color = np.where(left, np.array([190.0, 40.0, 45.0]), np.array([235.0, 232.0, 225.0]))
    # Shading across the pill's width.
    color = color * (1.0 - 0.25 * (np.abs(rows - center[0]) / radius).clip(0, 1) ** 2)[..., None]
    image = np.array([215.0, 215.0, 205.0]) + rng.normal(0.0, 2.5, (size, size, 3))
    _blend(image, body, color + rng.normal(0.0, 2.0, color.shape))
    return np.clip(image, 0, 255)


def _brain_geometry(size: int) -> tuple[float, float]:
    return 0.44 * size, 0.36 * size  # semi-axes: rows, cols


def _brain_scan(rng: np.random.Generator, size: int) -> Array:
    """An axial slice: bright skull ellipse, textured tissue, dark ventricles (1 channel)."""
    semi_r, semi_c = _brain_geometry(size)
    center = np.array([size / 2, size / 2]) + _jitter(rng, 1.0)
    rows, cols = _grid(size)
    ell = np.hypot((rows - center[0]) / semi_r, (cols - center[1]) / semi_c)
    skull = np.clip((1.0 - np.abs(ell - 0.97) / 0.05), 0, 1)
    tissue = np.clip((0.93 - ell) * 30.0, 0, 1)
    folds = 0.5 + 0.5 * np.sin(ell * 28.0 + 3.0 * _smooth_noise(rng, size, 4))
    texture = 95.0 + 25.0 * folds + 8.0 * _smooth_noise(rng, size, 8)
    ventricles = np.zeros((size, size))
    for side in (-1.0, 1.0):
        vr = np.hypot(
            (rows - center[0] + 0.05 * size) / (0.14 * size),
            (cols - center[1] - side * 0.07 * size) / (0.04 * size),
        )
        ventricles = np.maximum(ventricles, np.clip((1.0 - vr) * 4.0, 0, 1))
    gray = 8.0 + tissue * (texture - 70.0 * ventricles) + 200.0 * skull
    gray = gray * rng.uniform(0.96, 1.04) + rng.normal(0.0, 3.0, (size, size))
    return np.clip(gray, 0, 255)[..., None]


# --------------------------------------------------------------------------
# Where defects go
# --------------------------------------------------------------------------


def _site_anywhere(rng: np.random.Generator, size: int) -> tuple[float, float]:
    low, high = 0.25 * size, 0.75 * size
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def _site_washer(rng: np.random.Generator, size: int) -> tuple[float, float]:
    outer, inner = _washer_geometry(size)
    angle = rng.uniform(0, 2 * np.pi)
    r = (outer + inner) / 2
    return size / 2 + r * np.sin(angle), size / 2 + r * np.cos(angle)


def _site_capsule(rng: np.random.Generator, size: int) -> tuple[float, float]:
    half_len, _ = _capsule_geometry(size)
    return size / 2, size / 2 + rng.uniform(-0.6, 0.6) * half_len


def _site_brain(rng: np.random.Generator, size: int) -> tuple[float, float]:
    semi_r, semi_c = _brain_geometry(size)
    angle = rng.uniform(0, 2 * np.pi)
    return size / 2 + 0.55 * semi_r * np.sin(angle), size / 2 + 0.55 * semi_c * np.cos(angle)


# --------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------


def _scratch(image: Array, rng: np.random.Generator, center: tuple[float, float]) -> Array:
    """A thin straight line, much brighter or darker than its surroundings."""
    size = image.shape[0]
    angle = rng.uniform(0, np.pi)
    half = 0.18 * size
    direction = np.array([np.sin(angle), np.cos(angle)])
    a = np.asarray(center) - half * direction
    rows, cols = _grid(size)
    rel = np.stack([rows - a[0], cols - a[1]], axis=-1)
    t = np.clip(rel @ direction, 0.0, 2 * half)
    dist = np.hypot(rows - (a[0] + t * direction[0]), cols - (a[1] + t * direction[1]))
    mask = np.clip(1.5 - dist, 0.0, 1.0)  # about 2-3 px wide
    value = 250.0 if image.mean() < 128 else 15.0
    _blend(image, mask, value)
    return mask


def _hole(image: Array, rng: np.random.Generator, center: tuple[float, float]) -> Array:
    """A dark round hole."""
    radius = rng.uniform(0.07, 0.1) * image.shape[0]
    mask = _soft_disc(image.shape[0], center, radius)
    _blend(image, mask, 8.0)
    return mask


def _stain(image: Array, rng: np.random.Generator, center: tuple[float, float]) -> Array:
    """A semi-transparent brownish-green blob with an irregular rim."""
    size = image.shape[0]
    radius = rng.uniform(0.1, 0.13) * size
    rows, cols = _grid(size)
    dist = np.hypot(rows - center[0], cols - center[1]) / radius
    rim = 1.0 + 0.25 * _smooth_noise(rng, size, 6)
    mask = 0.75 * np.clip((rim - dist) * 4.0, 0.0, 1.0)
    _blend(image, mask, np.array([70.0, 95.0, 30.0])[: image.shape[2]])
    return mask


def _color_shift(image: Array, rng: np.random.Generator, center: tuple[float, float]) -> Array:
    """A patch whose colour channels are rotated: same texture, wrong hue."""
    radius = rng.uniform(0.12, 0.15) * image.shape[0]
    mask = _soft_disc(image.shape[0], center, radius)
    shifted = image[..., [2, 0, 1]] * 0.6 + np.array([0.0, 0.0, 90.0])
    _blend(image, mask, shifted)
    return mask


def _lesion(image: Array, rng: np.random.Generator, center: tuple[float, float]) -> Array:
    """A bright, soft-edged round lesion in grayscale tissue."""
    size = image.shape[0]
    radius = rng.uniform(0.07, 0.1) * size
    rows, cols = _grid(size)
    dist = np.hypot(rows - center[0], cols - center[1]) / radius
    mask = np.clip(1.6 - dist, 0.0, 1.0)
    _blend(image, mask, 235.0)
    return mask


_DEFECTS: dict[str, DefectFn] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "color_shift": _color_shift,
    "lesion": _lesion,
}

DATASETS: dict[str, dict[str, _Category]] = {
    "industrial_textures": {
        "fabric": _Category(_fabric, _site_anywhere, ("color_shift", "hole", "stain")),
        "metal_grid": _Category(_metal_grid, _site_anywhere, ("hole", "scratch")),
    },
    "industrial_objects": {
        "washer": _Category(_washer, _site_washer, ("scratch", "stain")),
        "capsule": _Category(_capsule, _site_capsule, ("color_shift", "hole")),
    },
    "medical_scans": {
        "brain_scan": _Category(_brain_scan, _site_brain, ("hole", "lesion"), grayscale=True),
    },
}


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _rng(seed: int, *names: object) -> np.random.Generator:
    """A generator keyed by seed and names, so each image is independent of the others."""
    key = zlib.crc32("/".join(map(str, names)).encode("utf-8"))
    return np.random.default_rng([seed, key])


def _save(image: Array, path: str, grayscale: bool) -> None:
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    pixels = pixels[..., 0] if grayscale else pixels
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def _save_mask(weights: Array, path: str) -> None:
    """A binary mask PNG (mode L: 255 on the defect, 0 elsewhere) of blend weights (size, size)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.where(weights > 0, 255, 0).astype(np.uint8)).save(path, format="PNG")


def mask_path(category_root: str, defect: str, index: int) -> str:
    """Where the demo writes the mask of ``test/<defect>/<index>.png``: MVTec AD's place."""
    return os.path.join(category_root, "ground_truth", defect, f"{index:03d}_mask.png")


def generate_demo(
    root: str,
    *,
    seed: int = 0,
    image_size: int = 96,
    n_train: int = 6,
    n_test_good: int = 4,
    n_test_defect_per_type: int = 2,
    n_calibration: int = 0,
) -> list[tuple[str, str]]:
    """Write the demo datasets under local folder ``root`` in MVTec layout.

    Layout: ``<root>/<dataset>/<category>/{train/good, test/good,
    test/<defect_type>}/NNN.png``, and for each defect image its ground-truth
    mask ``<category>/ground_truth/<defect_type>/NNN_mask.png`` (same size,
    255 on every pixel the defect painted, 0 elsewhere). With ``n_calibration``,
    that many more normal images per category in ``validation/good`` (MVTec LOCO
    AD's place for them, which ``make_manifest`` reads as role ``calibration``):
    the normal images the decisions are calibrated on (at least
    ``pipeline.core.calibration.min_calibration_size(alpha)``, 19 for alpha 0.05). Same
    arguments → byte-identical files. Existing files with other names are left alone,
    so use a fresh folder.

    Returns:
        ``(dataset_root, dataset_name)`` pairs, ready for ``make_manifest``.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if n_calibration < 0:
        raise ValueError(f"n_calibration must be 0 or more, got {n_calibration}")
    pairs = []
    total = 0
    for dataset, categories in DATASETS.items():
        dataset_root = os.path.join(root, dataset)
        for category, spec in categories.items():
            base = os.path.join(dataset_root, category)
            jobs: list[tuple[str, str | None, int]] = [
                ("train/good", None, i) for i in range(n_train)
            ]
            jobs += [("validation/good", None, i) for i in range(n_calibration)]
            jobs += [("test/good", None, i) for i in range(n_test_good)]
            jobs += [
                (f"test/{defect}", defect, i)
                for defect in spec.defects
                for i in range(n_test_defect_per_type)
            ]
            for split, defect, index in jobs:
                rng = _rng(seed, dataset, category, split, index)
                image = spec.normal(rng, image_size)
                if defect is not None:
                    site = spec.site(rng, image_size)
                    weights = _DEFECTS[defect](image, rng, site)
                    _save_mask(weights, mask_path(base, defect, index))
                _save(image, os.path.join(base, split, f"{index:03d}.png"), spec.grayscale)
            total += len(jobs)
        pairs.append((dataset_root, dataset))
    LOG.info("wrote %d demo images (%d of them for calibration; and a mask per defect image) "
             "in %d datasets under %s", total,
             n_calibration * sum(len(c) for c in DATASETS.values()), len(pairs), root)
    return pairs
