"""Anomaly maps as files and pictures: a 16-bit PNG to store, a colour overlay to look at.

A map is stored as a 16-bit grayscale PNG of the map normalised by its own minimum and
maximum, which the row keeps beside it, so the stored values come back to within one step
of 65 535 of their range. The overlay blends a colour map into the image in proportion to
the normalised value: where the map is low the image shows unchanged, where it is high the
colour covers it. Numpy and Pillow only; the colour maps are written out here (matplotlib's
``jet`` segments, Google's polynomial ``turbo``) so nothing heavier is needed.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

_LEVELS = 65535

# matplotlib's jet (matplotlib/_cm.py): per channel, (x, value) breakpoints, linear between.
_JET = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)
# Turbo's polynomial approximation (Mikhailov, Google 2019): per channel, coefficients of
# 1, x, ..., x^5.
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])
COLORMAPS = ("jet", "turbo")


def _map_array(amap: np.ndarray, name: str = "amap") -> np.ndarray:
    a = np.asarray(amap, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty (height, width) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has {int((~np.isfinite(a)).sum())} non-finite values")
    return a


def _range(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(hi - lo)) or hi < lo:
        raise ValueError(f"need finite lo <= hi, got lo={lo!r}, hi={hi!r}")
    return lo, hi


def encode_map_png(amap: np.ndarray) -> tuple[bytes, float, float]:
    """An (H, W) float map as a 16-bit grayscale PNG, and the (lo, hi) it was normalised by.

    Pixel values are round((amap − lo) / (hi − lo) · 65535) with lo, hi the map's own minimum
    and maximum; a constant map (hi == lo) is stored as zeros. ``decode_map_png(png, lo,
    hi)`` inverts it to within half a step, (hi − lo) / 131070.
    """
    a = _map_array(amap)
    lo, hi = _range(a.min(), a.max())
    if hi > lo:
        q = np.rint((a - lo) * (_LEVELS / (hi - lo)))
    else:
        q = np.zeros_like(a)
    pixels = np.clip(q, 0, _LEVELS).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")  # uint16 → mode I;16 → 16-bit PNG
    return buf.getvalue(), lo, hi


def decode_map_png(data: bytes, lo: float, hi: float) -> np.ndarray:
    """The (H, W) float32 map of ``encode_map_png``'s PNG and its (lo, hi)."""
    lo, hi = _range(lo, hi)
    with Image.open(io.BytesIO(data)) as img:
        if not img.mode.startswith("I;16") and img.mode != "I":
            raise ValueError(f"not a 16-bit grayscale PNG: mode {img.mode!r}")
        q = np.asarray(img).astype(np.float64)
    return (lo + q * ((hi - lo) / _LEVELS)).astype(np.float32)


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """Colours of ``values`` in [0, 1] (clipped): (...) → (..., 3) float32 RGB in [0, 1].

    ``jet`` is matplotlib's (its breakpoints, interpolated exactly rather than through a
    256-entry table); ``turbo`` is Google's degree-5 polynomial approximation.
    """
    if name not in COLORMAPS:
        raise ValueError(f"cmap must be one of {COLORMAPS}, got {name!r}")
    t = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    if name == "jet":
        rgb = [np.interp(t, [x for x, _ in seg], [v for _, v in seg]) for seg in _JET]
        return np.stack(rgb, axis=-1).astype(np.float32)
    powers = t[..., None] ** np.arange(6)  # (..., 6): 1, t, ..., t^5
    return np.clip(powers @ _TURBO.T, 0.0, 1.0).astype(np.float32)


def _resized_map(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) → (H, W) = size, bilinear (half-pixel centres) through Pillow's float mode."""
    if a.shape == size:
        return a
    img = Image.fromarray(a.astype(np.float32))  # mode F
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR), np.float64)


def overlay(image: Image.Image, amap: np.ndarray, lo: float, hi: float, alpha: float = 0.6,
            cmap: str = "jet") -> Image.Image:
    """The RGB image with the colour-mapped anomaly map blended in.

    amap: (H, W) map for the image, resized bilinearly first if its shape is not the image's
    (height, width) (so a full-size map can go on a thumbnail). With t = the map normalised
    to [0, 1] by lo and hi (clipped), each pixel is image · (1 − alpha·t) + colour(t) ·
    alpha·t: values at or below lo leave the image as it is, values at or above hi are
    alpha parts colour. When hi == lo, t is 1 above lo and 0 elsewhere.
    returns: a new RGB image of the image's size.
    """
    lo, hi = _range(lo, hi)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    base = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    a = _resized_map(_map_array(amap), base.shape[:2])
    if hi > lo:
        t = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    else:
        t = (a > lo).astype(np.float64)
    colours = colormap(t, cmap).astype(np.float64) * 255.0
    weight = alpha * t[..., None]
    blended = base * (1.0 - weight) + colours * weight
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def outline_mask(image: Image.Image, mask: np.ndarray,
                 colour: tuple[int, int, int] = (255, 255, 255), width: int = 2) -> Image.Image:
    """The RGB image with the boundary of a binary defect mask drawn in ``colour``.

    mask: (h, w) bool (any nonzero pixel is a defect), resized to the image's size by
    nearest neighbour when it differs (a full-size mask on a thumbnail). The boundary is
    the mask's pixels within ``width`` pixels of a pixel outside it (or of the border).
    returns: a new RGB image of the image's size.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty (height, width) array, got shape {m.shape}")
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    base = np.asarray(image.convert("RGB")).copy()
    h, w = base.shape[:2]
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray((m != 0).astype(np.uint8) * 255).resize(
            (w, h), Image.Resampling.NEAREST)) > 0
    inside = m != 0
    inner = inside.copy()
    for _ in range(width):  # erode by one pixel (4-neighbourhood), the border counts as outside
        padded = np.pad(inner, 1, constant_values=False)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    base[inside & ~inner] = colour
    return Image.fromarray(base)


def encode_png(image: Image.Image) -> bytes:
    """The image as PNG bytes (lossless, any mode PNG can hold)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: Image.Image, quality: int = 85) -> bytes:
    """The image as JPEG bytes; modes JPEG cannot hold (RGBA, P, I;16, ...) become RGB."""
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in [1, 95], got {quality!r}")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def thumbnail(image: Image.Image, max_side: int = 256) -> Image.Image:
    """A copy no larger than max_side on either side, aspect kept, never enlarged."""
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side!r}")
    small = image.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return small
