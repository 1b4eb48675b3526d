"""Tests for pipeline.core.images: every bad input fails cleanly, every odd format decodes."""

from __future__ import annotations

import hashlib
import io
import pickle
import uuid
import warnings

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.core import images
from pipeline.core.images import ImageLoadError, content_hash, decode_image, load_image, read_bytes
from tests import badinputs

READ, DECODE = "read_image", "decode_image"

# case in tests/badinputs.py -> (stage, keyword the reason must contain)
EXPECTED_ERRORS = {
    "corrupt_png": (DECODE, "corrupt"),
    "truncated_png": (DECODE, "truncated"),
    "truncated_jpeg": (DECODE, "truncated"),
    "missing_file": (READ, "not found"),
    "zero_bytes": (READ, "empty file"),
    "text_as_png": (DECODE, "not a recognised image format"),
    "tiny_1x1": (DECODE, "too small: 1x1"),
    "huge_header": (DECODE, "exceeds the limit"),
}

# case -> (mode as stored on disk, size after decoding)
ODD_FORMATS = {
    "grayscale": ("L", (32, 32)),
    "gray16": ("I;16", (32, 32)),
    "rgba": ("RGBA", (32, 32)),
    "cmyk_jpeg": ("CMYK", (32, 32)),
    "palette": ("P", (32, 32)),
    "exif_rotated": ("RGB", (24, 40)),  # stored 40x24, EXIF says rotate 90°
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    df = badinputs.build_bad_inputs(str(tmp_path_factory.mktemp("bad")))
    return {row["case"]: row for row in df.to_dict("records") if not row["case"].startswith("reference")}


@pytest.fixture(scope="module")
def bad_frame(tmp_path_factory):
    return badinputs.build_bad_inputs(str(tmp_path_factory.mktemp("bad_frame")))


def _png(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


def test_fixture_and_expectations_cover_the_same_broken_cases(bad):
    broken = {case for case, row in bad.items() if row["category"] == badinputs.BROKEN
              and row["expect"] == "error"}
    assert broken == set(EXPECTED_ERRORS)


@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_bad_input_raises_image_load_error(bad, case):
    stage, keyword = EXPECTED_ERRORS[case]
    uri = bad[case]["image_uri"]

    with pytest.raises(ImageLoadError) as info:
        load_image(uri)

    err = info.value
    assert err.stage == stage
    assert keyword in err.reason
    assert err.uri == uri
    assert uri in str(err) and err.reason in str(err)


def test_every_decodable_row_of_the_fixture_loads_and_broken_ones_do_not(bad_frame):
    for row in bad_frame.to_dict("records"):
        if row["case"] in EXPECTED_ERRORS:
            with pytest.raises(ImageLoadError):
                load_image(row["image_uri"])
        else:  # references, scorable queries and rows that fail for non-image reasons
            assert load_image(row["image_uri"]).mode == "RGB", row["case"]


def test_huge_header_is_rejected_without_decoding_pixels():
    # 5000x5000 is under Pillow's limit; only our own header check can catch it,
    # and it must do so before decoding (the data would otherwise be "truncated").
    data = badinputs.huge_header_png(5000, 5000)
    with pytest.raises(ImageLoadError) as info:
        decode_image(data, max_pixels=1_000_000)
    assert "declared size 5000x5000 exceeds the limit of 1000000 pixels" in info.value.reason

    with pytest.raises(ImageLoadError, match="truncated|corrupt"):
        decode_image(data)


@pytest.mark.parametrize("as_error", [False, True])
def test_pillow_decompression_bomb_warning_path_ends_as_image_load_error(as_error):
    # 10000x10000 lies between Pillow's warning and error thresholds.
    data = badinputs.huge_header_png(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if as_error else "ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError) as info:
            decode_image(data, max_pixels=10**9)
    assert info.value.stage == DECODE
    assert "exceeds the limit" in info.value.reason


def test_size_limits_are_parameters():
    data = _png(Image.new("RGB", (32, 32)))
    assert decode_image(data).size == (32, 32)
    with pytest.raises(ImageLoadError, match="32x32 exceeds the limit of 1000"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(ImageLoadError, match="too small: 32x32 pixels \\(minimum 33x33\\)"):
        decode_image(data, min_side=33)


def test_empty_bytes_fail_at_decode_stage():
    with pytest.raises(ImageLoadError) as info:
        decode_image(b"")
    assert (info.value.stage, info.value.reason) == (DECODE, "empty file (0 bytes)")


@pytest.mark.parametrize("warning_filter", ["ignore", "error"])
def test_mangled_files_never_raise_anything_but_image_load_error(warning_filter):
    warnings.simplefilter(warning_filter)  # pytest restores the filters afterwards
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    sources = [_png(Image.fromarray(pixels))]
    for fmt in ("JPEG", "BMP", "TIFF", "GIF", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        sources.append(buffer.getvalue())

    outcomes = {"ok": 0, "error": 0}
    for source in sources:
        for _ in range(40):
            data = bytearray(source)
            cut = int(rng.integers(1, len(data)))
            if rng.random() < 0.5:
                data = data[:cut]
            else:
                for pos in rng.integers(0, len(data), 8):
                    data[pos] = int(rng.integers(0, 256))
            try:
                result = decode_image(bytes(data))
            except ImageLoadError as err:
                assert err.stage == DECODE and err.reason
                outcomes["error"] += 1
            else:
                assert result.mode == "RGB"
                outcomes["ok"] += 1
    assert outcomes["error"] > 0


def test_read_errors_for_directories_and_unknown_protocols(tmp_path):
    with pytest.raises(ImageLoadError) as info:
        read_bytes(str(tmp_path))
    assert info.value.stage == READ

    with pytest.raises(ImageLoadError) as info:
        read_bytes("nosuchprotocol://bucket/a.png")
    assert info.value.stage == READ


def test_image_load_error_pickles():
    err = ImageLoadError(DECODE, "truncated or corrupt image data", "gs://b/a.png")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.stage, clone.reason, clone.uri) == (err.stage, err.reason, err.uri)
    assert str(clone) == str(err)


# --------------------------------------------------------------------------
# Odd but valid formats
# --------------------------------------------------------------------------


def test_fixture_covers_every_odd_format(bad):
    assert set(ODD_FORMATS) <= set(bad)
    for case in ODD_FORMATS:
        assert bad[case]["expect"] == "score"


@pytest.mark.parametrize("case", sorted(ODD_FORMATS))
def test_odd_format_decodes_to_rgb(bad, case):
    stored_mode, size = ODD_FORMATS[case]
    uri = bad[case]["image_uri"]
    with Image.open(uri) as raw:
        assert raw.mode == stored_mode  # the fixture really exercises this mode

    im = load_image(uri)

    assert im.mode == "RGB"
    assert im.size == size


def test_16_bit_uses_the_full_range():
    values = np.array([[0, 257, 1000, 32768, 65535] * 2] * 10, dtype=np.uint16)
    im = decode_image(_png(Image.fromarray(values)), min_side=1)
    red = np.asarray(im)[0, :5, 0]
    assert red.tolist() == [0, 1, 4, 128, 255]  # round(v * 255 / 65535)
    rgb = np.asarray(im)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_32_bit_integer_and_float_rules():
    to_rgb = images._to_rgb

    sixteen_bit_in_i = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert np.asarray(to_rgb(sixteen_bit_in_i))[0, :, 0].tolist() == [0, 128, 255]

    full_range = Image.fromarray(np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32))
    assert np.asarray(to_rgb(full_range))[0, :, 0].tolist() == [0, 128, 255]

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]

    wide = Image.fromarray(np.array([[np.nan, 100.0, 300.0, -5.0]], dtype=np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_alpha_is_composited_onto_black():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :2, 3] = 0
    rgba[:, 2:4, 3] = 255
    rgba[:, 4:, 3] = 128
    out = np.asarray(decode_image(_png(Image.fromarray(rgba))))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [200, 100, 50]
    assert np.abs(out[0, 4].astype(int) - [100, 50, 25]).max() <= 1

    la = Image.fromarray(rgba[..., [0, 3]])  # L=200, alpha as above
    assert la.mode == "LA"
    out = np.asarray(decode_image(_png(la)))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 2].tolist() == [200, 200, 200]


def test_palette_transparency_becomes_black():
    im = Image.new("P", (8, 8), 1)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(0, (0, 0, 4, 8))
    out = np.asarray(decode_image(_png(im, transparency=0)))
    assert out[0, 0].tolist() == [0, 0, 0]  # transparent red → black
    assert out[0, 7].tolist() == [0, 255, 0]
    # Without transparency the palette colour is kept.
    assert np.asarray(decode_image(_png(im)))[0, 0].tolist() == [255, 0, 0]


def test_grayscale_and_cmyk_colours():
    gray = Image.new("L", (8, 8), 77)
    assert np.asarray(decode_image(_png(gray)))[0, 0].tolist() == [77, 77, 77]

    one_bit = Image.new("1", (8, 8), 1)
    assert np.asarray(decode_image(_png(one_bit)))[0, 0].tolist() == [255, 255, 255]

    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(buffer, format="JPEG", quality=95)
    out = np.asarray(decode_image(buffer.getvalue()))
    assert out.min() >= 250  # no ink → white


def test_exif_rotation_puts_content_upright():
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())

    out = np.asarray(decode_image(buffer.getvalue()))

    assert out.shape == (40, 24, 3)
    assert out[5, 12, 0] > 200 and out[5, 12, 2] < 60  # top is red
    assert out[35, 12, 2] > 200 and out[35, 12, 0] < 60  # bottom is blue


# --------------------------------------------------------------------------
# URIs and hashing
# --------------------------------------------------------------------------


def test_memory_uris_work_through_fsspec():
    uri = f"memory://images/{uuid.uuid4().hex}/a.png"
    data = _png(Image.new("RGB", (16, 12), (10, 20, 30)))
    with fsspec.open(uri, "wb") as f:
        f.write(data)

    assert read_bytes(uri) == data
    im = load_image(uri)
    assert im.size == (16, 12)
    assert np.asarray(im)[0, 0].tolist() == [10, 20, 30]

    with pytest.raises(ImageLoadError) as info:
        load_image(uri.replace("a.png", "missing.png"))
    assert (info.value.stage, info.value.reason) == (READ, "file not found")


def test_load_image_passes_options_to_decode(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(Image.new("RGB", (16, 16))))
    assert load_image(str(path)).size == (16, 16)
    with pytest.raises(ImageLoadError, match="too small"):
        load_image(str(path), min_side=20)


def test_content_hash_is_sha256_of_bytes():
    assert content_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert content_hash(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert content_hash(b"abc") != content_hash(b"abd")
