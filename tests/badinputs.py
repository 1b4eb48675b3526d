"""Builds a directory of bad and odd inputs plus a manifest describing them.

Not a test module: pipeline tests import :func:`build_bad_inputs` to run the
whole job over every kind of input that goes wrong in practice and check the
outcome of each row through the pass-through column ``expect``:

* ``"score"``: a decodable query whose category has at least one reference
  (fewer than k references still scores, with what there is);
* ``"error"``: an undecodable or missing query, an unknown role, the second
  row of a duplicated image_id, a query of a category without references;
* ``"reference"``: a normal reference image.

The column ``case`` names each row's situation (e.g. ``"truncated_png"``).
All images are small (32x32 or so) except the one whose header merely
declares a huge size.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image

DATASET = "bad"
SIZE = 32
HUGE_SIDE = 100_000

# Categories: two with enough references, one with fewer than k=4, one with none.
BROKEN = "broken_files"
FORMATS = "odd_formats"
FEW_REFS = "few_refs"
NO_REFS = "no_refs"
N_GOOD_REFERENCES = 5
N_FEW_REFERENCES = 2


def _pattern(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth colour gradient with mild noise: a plausible 'normal' image."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1.0 - x * y], axis=-1) * 200.0 + 20.0
    noisy = base + rng.normal(0.0, 6.0, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _png_bytes(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def huge_header_png(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """A valid-looking PNG whose IHDR declares ``width``x``height`` RGB, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg(rng: np.random.Generator) -> bytes:
    """A 40x24 JPEG tagged orientation 6 (display rotated 90° clockwise: 24x40)."""
    pixels = _pattern(rng, 40)[:24]
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(Image.fromarray(pixels), exif=exif.tobytes())


def _palette_with_transparency(rng: np.random.Generator) -> bytes:
    im = Image.fromarray(_pattern(rng)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _png_bytes(im, transparency=0)


def _rgba(rng: np.random.Generator) -> bytes:
    rgb = _pattern(rng)
    alpha = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    return _png_bytes(Image.fromarray(np.dstack([rgb, alpha])))


def _gray16(rng: np.random.Generator) -> bytes:
    ramp = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE)
    noisy = np.clip(ramp + rng.normal(0, 500, ramp.shape), 0, 65535)
    return _png_bytes(Image.fromarray(noisy.astype(np.uint16)))


def build_bad_inputs(root: str) -> pd.DataFrame:
    """Write the bad-input fixture set under ``root`` and return its manifest.

    Columns: image_uri, dataset, category, role, label, image_id, defect_type,
    plus pass-through ``expect`` ("score" / "error" / "reference") and ``case``.
    Deterministic: same root → same files and rows.
    """
    rng = np.random.default_rng(1234)
    rows: list[dict] = []

    def put(name: str, category: str, data: Optional[bytes]) -> str:
        path = os.path.join(root, category, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if data is not None:  # None: deliberately left missing
            with open(path, "wb") as f:
                f.write(data)
        return path

    def add(
        case: str,
        category: str,
        name: str,
        data: Optional[bytes],
        *,
        expect: str,
        role: str = "query",
        label: Optional[int] = 0,
        image_id: Optional[str] = None,
        defect_type: Optional[str] = None,
        uri_prefix: str = "",
    ) -> None:
        path = put(name, category, data)
        rows.append(
            {
                "image_uri": uri_prefix + path,
                "dataset": DATASET,
                "category": category,
                "role": role,
                "label": label,
                "image_id": image_id or f"{category}/{case}",
                "defect_type": defect_type,
                "expect": expect,
                "case": case,
            }
        )

    def normal_png() -> bytes:
        return _png_bytes(Image.fromarray(_pattern(rng)))

    # References: enough for two categories, fewer than k for one, none for another.
    for category, count in (
        (BROKEN, N_GOOD_REFERENCES),
        (FORMATS, N_GOOD_REFERENCES),
        (FEW_REFS, N_FEW_REFERENCES),
    ):
        for i in range(count):
            add(f"reference_{i}", category, f"ref_{i:03d}.png", normal_png(),
                expect="reference", role="reference")

    # Broken files: every one must end as a per-row error.
    valid_png = normal_png()
    valid_jpeg = _jpeg_bytes(Image.fromarray(_pattern(rng, 64)))
    garbage = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    broken = [
        ("corrupt_png", "corrupt.png", b"\x89PNG\r\n\x1a\n" + garbage),
        ("truncated_png", "truncated.png", valid_png[: len(valid_png) // 2]),
        ("truncated_jpeg", "truncated.jpg", valid_jpeg[: len(valid_jpeg) // 2]),
        ("missing_file", "missing.png", None),
        ("zero_bytes", "empty.png", b""),
        ("text_as_png", "notes.png", b"this is a text file, not an image\n"),
        ("tiny_1x1", "tiny.png", _png_bytes(Image.new("RGB", (1, 1), (200, 10, 10)))),
        ("huge_header", "huge.png", huge_header_png()),
    ]
    for case, name, data in broken:
        add(case, BROKEN, name, data, expect="error", label=None)
    add("good_query", BROKEN, "good.png", normal_png(), expect="score")

    # Odd but valid formats: every one must decode and score.
    odd = [
        ("grayscale", "gray.png", _png_bytes(Image.fromarray(_pattern(rng)).convert("L"))),
        ("gray16", "gray16.png", _gray16(rng)),
        ("rgba", "rgba.png", _rgba(rng)),
        ("cmyk_jpeg", "cmyk.jpg", _jpeg_bytes(Image.fromarray(_pattern(rng)).convert("CMYK"))),
        ("palette", "palette.png", _palette_with_transparency(rng)),
        ("exif_rotated", "rotated.jpg", _exif_rotated_jpeg(rng)),
    ]
    for case, name, data in odd:
        add(case, FORMATS, name, data, expect="score")
    # A file:// URL instead of a plain path.
    add("file_url", FORMATS, "via_url.png", normal_png(), expect="score", uri_prefix="file://")
    # Two different images sharing one image_id: the first scores, the second errors.
    add("duplicate_id_first", FORMATS, "dup_a.png", normal_png(),
        expect="score", image_id="dup-0001")
    add("duplicate_id_second", FORMATS, "dup_b.png", normal_png(),
        expect="error", image_id="dup-0001")
    # A decodable image with a role the manifest does not allow.
    add("unknown_role", FORMATS, "train_role.png", normal_png(), expect="error", role="train")

    # Fewer references than k: scored with the two there are.
    for i in range(2):
        add(f"few_refs_query_{i}", FEW_REFS, f"query_{i}.png", normal_png(),
            expect="score", label=i, defect_type="stain" if i else None)
    # No references at all: nothing to compare against.
    for i in range(2):
        add(f"no_refs_query_{i}", NO_REFS, f"query_{i}.png", normal_png(),
            expect="error", label=i, defect_type="stain" if i else None)

    df = pd.DataFrame(rows)
    df["label"] = df["label"].astype("Int64")
    return df
