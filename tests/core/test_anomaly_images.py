"""Tests for pipeline.core.anomaly_images: stored maps come back, overlays show what they say."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline.core.anomaly_images import (
    colormap, decode_map_png, encode_jpeg, encode_map_png, encode_png, outline_mask, overlay,
    thumbnail)

STEP = 1 / 65535


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ihdr(png: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) read straight from the PNG header."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    return width, height, depth, colour


# --- the stored map ----------------------------------------------------------------------

def test_map_round_trip_within_one_step():
    amap = _rng().normal(2.0, 3.0, size=(37, 53))
    png, lo, hi = encode_map_png(amap)
    assert (lo, hi) == (amap.min(), amap.max())
    back = decode_map_png(png, lo, hi)
    assert back.shape == amap.shape and back.dtype == np.float32
    err = np.abs(back.astype(np.float64) - amap).max()
    assert err <= (hi - lo) * STEP
    assert err <= (hi - lo) * STEP / 2 + 1e-6  # rounding, not truncation
    assert back.min() == pytest.approx(lo, abs=1e-6) and back.max() == pytest.approx(hi, abs=1e-6)


def test_map_png_is_16_bit_grayscale_and_uses_the_full_range():
    amap = np.linspace(-1.0, 1.0, 40 * 30).reshape(30, 40)
    png, _, _ = encode_map_png(amap)
    assert _ihdr(png) == (40, 30, 16, 0)  # width, height, 16 bits, grayscale
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.mode == "I;16" and img.size == (40, 30)
        q = np.asarray(img)
    assert q.dtype == np.uint16 and q.min() == 0 and q.max() == 65535
    # 1200 evenly spaced values stay distinct and ordered: more than 8 bits are kept.
    assert (np.diff(q.reshape(-1).astype(np.int64)) > 0).all()


def test_constant_map_round_trips():
    png, lo, hi = encode_map_png(np.full((5, 7), 0.25))
    assert lo == hi == 0.25
    with Image.open(io.BytesIO(png)) as img:
        assert not np.asarray(img).any()
    np.testing.assert_array_equal(decode_map_png(png, lo, hi), np.full((5, 7), 0.25, np.float32))


def test_narrow_range_far_from_zero():
    """The step is relative to the range, not the values; float32's own rounding of values
    near 1000 (6e-5) is the larger error here and is the caveat of a float32 result."""
    amap = 1000.0 + 1e-2 * _rng(1).random((16, 16))
    png, lo, hi = encode_map_png(amap)
    back = decode_map_png(png, lo, hi).astype(np.float64)
    assert np.abs(back - amap).max() <= (hi - lo) * STEP + np.spacing(np.float32(1000.0))


@pytest.mark.parametrize("bad", [
    np.zeros(5), np.zeros((0, 4)), np.zeros((2, 2, 2)),
    np.array([[0.0, np.nan]]), np.array([[0.0, np.inf]]),
])
def test_bad_maps_are_refused(bad):
    with pytest.raises(ValueError):
        encode_map_png(bad)


def test_decode_refuses_a_wrong_range_or_an_8_bit_png():
    png, lo, hi = encode_map_png(np.eye(3))
    with pytest.raises(ValueError, match="lo <= hi"):
        decode_map_png(png, hi, lo - 1)
    with pytest.raises(ValueError, match="16-bit"):
        decode_map_png(encode_png(Image.new("L", (3, 3))), 0.0, 1.0)


# --- colour maps -------------------------------------------------------------------------

def test_jet_matches_matplotlibs_breakpoints():
    got = colormap(np.array([0.0, 0.11, 0.5, 0.89, 1.0, -3.0, 7.0]), "jet")
    want = [(0, 0, 0.5), (0, 0, 1), (0.15 / 0.31, 1, 1 - 0.16 / 0.31), (1, 0.02 / 0.27, 0),
            (0.5, 0, 0), (0, 0, 0.5), (0.5, 0, 0)]  # out-of-range values are clipped
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_turbo_runs_dark_blue_to_green_to_dark_red():
    t = np.linspace(0, 1, 101)
    rgb = colormap(t.reshape(1, 101), "turbo")
    assert rgb.shape == (1, 101, 3) and rgb.dtype == np.float32
    assert (rgb >= 0).all() and (rgb <= 1).all()
    low, mid, high = rgb[0, 0], rgb[0, 50], rgb[0, 100]
    assert low.sum() < 0.5 and mid[1] == mid.max() and high[0] == high.max() and high.sum() < 0.8
    with pytest.raises(ValueError, match="cmap"):
        colormap(t, "viridis")


# --- the overlay -------------------------------------------------------------------------

def _photo(h: int = 24, w: int = 36) -> Image.Image:
    return Image.fromarray(_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ramp_map(h: int = 24, w: int = 36) -> np.ndarray:
    """Columns 0-11 below lo (0), 12-23 rising through (0, 1), 24-35 at or above hi (1)."""
    cols = np.concatenate([np.full(12, -2.0), np.linspace(0.05, 0.95, 12), np.full(12, 1.0)])
    cols[-6:] = 5.0  # above hi: clipped to hi
    return np.tile(cols, (h, 1))


def test_overlay_leaves_low_values_alone_and_colours_high_ones():
    image = _photo()
    out = overlay(image, _ramp_map(), lo=0.0, hi=1.0, alpha=0.6)
    assert out.mode == "RGB" and out.size == image.size
    img, got = np.asarray(image).astype(int), np.asarray(out).astype(int)
    np.testing.assert_array_equal(got[:, :12], img[:, :12])
    red = np.array([127.5, 0.0, 0.0])  # jet at the top
    np.testing.assert_allclose(got[:, 24:], 0.4 * img[:, 24:] + 0.6 * red, atol=0.51)
    # In between, the colour's share grows with the value.
    share = np.abs(got[:, 12:24] - img[:, 12:24]).sum(axis=(0, 2))
    assert share[0] < share[-1]


def test_overlay_at_full_alpha_is_the_colour_map():
    out = np.asarray(overlay(_photo(), _ramp_map(), 0.0, 1.0, alpha=1.0, cmap="turbo"))
    want = np.rint(colormap(np.ones(1), "turbo")[0].astype(np.float64) * 255)
    np.testing.assert_array_equal(out[:, 24:], np.broadcast_to(want, out[:, 24:].shape))
    # In between: image · (1 − t) + colour(t) · t, t the value itself (lo 0, hi 1).
    t = _ramp_map()[0, 12:24, None]
    img = np.asarray(_photo())[0, 12:24].astype(np.float64)
    want = np.rint(img * (1 - t) + colormap(t[:, 0], "turbo") * 255.0 * t)
    np.testing.assert_allclose(out[0, 12:24], want, atol=1)


def test_overlay_resizes_a_map_of_another_size_and_takes_any_mode():
    image = _photo(40, 60).convert("RGBA")
    amap = np.zeros((10, 15))
    amap[:, 10:] = 1.0  # the right third, hot
    out = overlay(image, amap, 0.0, 1.0)
    assert out.mode == "RGB" and out.size == (60, 40)
    base = np.asarray(image.convert("RGB")).astype(int)
    got = np.asarray(out).astype(int)
    np.testing.assert_array_equal(got[:, :36], base[:, :36])
    assert (np.abs(got[:, 44:] - base[:, 44:]).sum(axis=2) > 0).all()


def test_overlay_with_equal_bounds_marks_values_above():
    image = _photo()
    amap = np.zeros((24, 36))
    amap[:, 30:] = 2.0
    got = np.asarray(overlay(image, amap, 0.0, 0.0, alpha=1.0)).astype(int)
    np.testing.assert_array_equal(got[:, :30], np.asarray(image)[:, :30])
    np.testing.assert_array_equal(got[:, 30:], np.broadcast_to([128, 0, 0], got[:, 30:].shape))


@pytest.mark.parametrize("kwargs", [
    dict(lo=1.0, hi=0.0), dict(lo=0.0, hi=float("nan")), dict(lo=0.0, hi=1.0, alpha=1.5),
    dict(lo=0.0, hi=1.0, cmap="gray"),
])
def test_overlay_refuses_bad_options(kwargs):
    with pytest.raises(ValueError):
        overlay(_photo(), np.zeros((24, 36)), **kwargs)


# --- plain image helpers -----------------------------------------------------------------

def test_png_is_lossless_and_jpeg_decodes():
    image = _photo()
    with Image.open(io.BytesIO(encode_png(image))) as png:
        np.testing.assert_array_equal(np.asarray(png), np.asarray(image))
    for source in (image, image.convert("RGBA"), image.convert("P")):
        with Image.open(io.BytesIO(encode_jpeg(source, quality=90))) as jpg:
            assert jpg.format == "JPEG" and jpg.size == image.size and jpg.mode == "RGB"
    small = len(encode_jpeg(image, quality=10))
    assert small < len(encode_jpeg(image, quality=95))
    with pytest.raises(ValueError):
        encode_jpeg(image, quality=0)


def test_thumbnail_fits_keeps_aspect_and_never_enlarges():
    big = Image.new("RGB", (1000, 500))
    thumb = thumbnail(big)
    assert thumb.size == (256, 128) and big.size == (1000, 500)
    assert thumbnail(Image.new("RGB", (300, 900)), 100).size == (33, 100)
    assert thumbnail(Image.new("RGB", (40, 20))).size == (40, 20)
    with pytest.raises(ValueError):
        thumbnail(big, 0)


def test_outline_marks_the_masks_boundary_only():
    image = Image.new("RGB", (12, 10), (10, 20, 30))
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:9] = True  # a 6 x 6 square
    out = np.asarray(outline_mask(image, mask, colour=(255, 0, 0), width=1))
    red = (out == (255, 0, 0)).all(axis=-1)
    ring = mask.copy()
    ring[3:7, 4:8] = False  # the square less its interior
    np.testing.assert_array_equal(red, ring)
    assert (out[~ring] == (10, 20, 30)).all()
    # Width 2 takes the next ring in too; a half-size mask is scaled up by nearest neighbour.
    thick = (np.asarray(outline_mask(image, mask, width=2)) == 255).all(axis=-1)
    assert thick.sum() == 20 + 12
    small = np.zeros((5, 6), bool)
    small[1:4, 1:5] = True
    scaled = (np.asarray(outline_mask(image, small, width=1)) == 255).all(axis=-1)
    big = np.asarray(Image.fromarray(small.astype(np.uint8) * 255).resize(
        (12, 10), Image.Resampling.NEAREST)) > 0
    assert scaled.sum() > 0 and not (scaled & ~big).any()
    # A mask touching the border is outlined along the border.
    edge = (np.asarray(outline_mask(image, np.ones((10, 12), bool), width=1)) == 255).all(-1)
    assert edge.sum() == 2 * 12 + 2 * 8
    with pytest.raises(ValueError):
        outline_mask(image, np.zeros(5, bool))
