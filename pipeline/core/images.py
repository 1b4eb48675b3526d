"""Robust image reading: any fsspec URI in, an RGB PIL image or a clear error out.

Real image collections contain missing, empty, truncated, corrupt, tiny and
absurdly large files, and every colour mode Pillow knows. The pipeline must
turn each of those into a per-row error with a reason a user understands,
never a crashed worker or a half-decoded image that fails later. Everything
that can go wrong here surfaces as :class:`ImageLoadError`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

LOG = logging.getLogger(__name__)

STAGE_READ = "read_image"
STAGE_DECODE = "decode_image"
STAGE_PREPROCESS = "preprocess_image"

#: Same default as Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MIN_SIDE = 8


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be: at most ``max_pixels`` (decompression-bomb limit, checked from
    the header) and at least ``min_side`` pixels on each side."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


class ImageLoadError(Exception):
    """An image could not be read or decoded.

    Attributes:
        stage: ``"read_image"`` for I/O problems, ``"decode_image"`` for
            problems with the bytes themselves.
        reason: a short sentence a user understands.
        uri: the image's URI when known.
    """

    def __init__(self, stage: str, reason: str, uri: Optional[str] = None) -> None:
        # All constructor arguments go to Exception so the error pickles
        # (Beam ships exceptions between processes).
        super().__init__(stage, reason, uri)
        self.stage = stage
        self.reason = reason
        self.uri = uri

    def __str__(self) -> str:
        return f"{self.uri}: {self.reason}" if self.uri else self.reason


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of the raw file bytes: a cache key independent of the URI."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(uri: str) -> bytes:
    """Read the whole file at ``uri`` (a local path or any fsspec URL).

    Missing, unreadable and empty files raise ImageLoadError (stage
    ``read_image``). Errors that are not ``OSError`` (e.g. a cloud client's
    transient HTTP error) propagate, so that the runner can retry them.
    """
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageLoadError(STAGE_READ, "file not found", uri) from None
    except IsADirectoryError:
        raise ImageLoadError(STAGE_READ, "path is a directory, not a file", uri) from None
    except PermissionError:
        raise ImageLoadError(STAGE_READ, "permission denied", uri) from None
    except ImportError as exc:
        raise ImageLoadError(
            STAGE_READ, f"no filesystem installed for this URI ({exc})", uri
        ) from exc
    except ValueError as exc:
        raise ImageLoadError(
            STAGE_READ, f"unsupported or malformed URI ({exc})", uri
        ) from exc
    except OSError as exc:
        raise ImageLoadError(STAGE_READ, f"could not read file ({exc})", uri) from exc
    if not data:
        raise ImageLoadError(STAGE_READ, "empty file (0 bytes)", uri)
    return data


def _sniff_format(data: bytes) -> Optional[str]:
    """The format the leading magic bytes claim, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def _effective_max_pixels(max_pixels: int) -> int:
    """Our limit, capped by Pillow's global one (Pillow enforces it regardless)."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow_limit) if pillow_limit else max_pixels


def _open(data: bytes, limit: int) -> Image.Image:
    """Open lazily (header only); map Pillow's identification errors to ImageLoadError."""
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses before we can see the size; its message has the pixel count.
        match = re.search(r"\((\d+) pixels\)", str(exc))
        declared = f"of {int(match.group(1))} pixels " if match else ""
        raise ImageLoadError(
            STAGE_DECODE,
            f"declared size {declared}exceeds the limit of {limit} pixels "
            "(possible decompression bomb)",
        ) from exc
    except UnidentifiedImageError as exc:
        claimed = _sniff_format(data)
        if claimed:
            raise ImageLoadError(
                STAGE_DECODE,
                f"corrupt {claimed} data: the file starts like a {claimed} "
                "but its header cannot be parsed",
            ) from exc
        raise ImageLoadError(STAGE_DECODE, "not a recognised image format") from exc
    except Exception as exc:  # noqa: BLE001 - plugins raise many types on bad headers
        raise ImageLoadError(
            STAGE_DECODE, f"corrupt image header ({type(exc).__name__}: {exc})"
        ) from exc


def _check_size(size: tuple[int, int], limit: int, min_side: int) -> None:
    width, height = size
    if width * height > limit:
        raise ImageLoadError(
            STAGE_DECODE,
            f"declared size {width}x{height} exceeds the limit of {limit} pixels "
            "(possible decompression bomb)",
        )
    if width < min_side or height < min_side:
        raise ImageLoadError(
            STAGE_DECODE,
            f"image too small: {width}x{height} pixels "
            f"(minimum {min_side}x{min_side})",
        )


def _gray_to_uint8(im: Image.Image) -> Optional[np.ndarray]:
    """8-bit samples for 16/32-bit integer and float single-band modes, else None."""
    mode = im.mode
    if mode.startswith("I;16"):
        values = np.asarray(im).astype(np.float64)
        scaled = values * (255.0 / 65535.0)
    elif mode == "I":
        values = np.asarray(im).astype(np.float64)
        if values.size and values.min() >= 0 and values.max() <= 65535:
            scaled = values * (255.0 / 65535.0)
        else:
            scaled = (values + 2.0**31) * (255.0 / (2.0**32 - 1.0))
    elif mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        finite = values[np.isfinite(values)]
        in_unit_range = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
        scaled = values * 255.0 if in_unit_range else values
    else:
        return None
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _has_alpha(im: Image.Image) -> bool:
    bands = im.getbands()
    return (
        "A" in bands
        or "a" in bands
        or (im.mode == "P" and "transparency" in im.info)
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (rules in decode_image's docstring)."""
    if im.mode == "RGB":
        return im
    gray = _gray_to_uint8(im)
    if gray is not None:
        return Image.fromarray(gray).convert("RGB")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(
            STAGE_DECODE, f"unsupported colour mode {im.mode!r}"
        ) from exc


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Decode image bytes into a fully loaded 8-bit RGB image, upright.

    The declared size is checked from the header before any pixel is
    decoded: more than ``max_pixels`` pixels (or more than Pillow's own
    ``Image.MAX_IMAGE_PIXELS``, which Pillow enforces anyway) or a side
    shorter than ``min_side`` is rejected. Pixels are then loaded completely,
    so truncated files fail here and never later, and EXIF orientation is
    applied (a rotated photo comes back with width and height swapped).

    Colour rules:

    * grayscale ``L``, ``1``, ``LA``: the gray value is copied to R, G and B.
    * 16-bit ``I;16*``: linear scale of the full 0..65535 range to 0..255.
    * 32-bit integer ``I``: values that all lie in 0..65535 are treated as
      16-bit data (Pillow widens 16-bit files to ``I``) and scaled like
      ``I;16``; otherwise the full int32 range maps linearly to 0..255.
    * float ``F``: values all in [0, 1] are scaled by 255; otherwise they are
      taken as 0..255 and clipped (as Pillow's own ``F`` → ``L`` does); NaN → 0.
    * alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency): composited
      onto black, so fully transparent pixels become black and partially
      transparent ones darker. Black is a fixed, explicit choice that never
      depends on the data.
    * ``P``, ``CMYK``, ``YCbCr`` and other modes: Pillow's conversion to RGB.

    Raises:
        ImageLoadError: stage ``decode_image``, for every decoding problem;
            no other exception escapes.
    """
    if not data:
        raise ImageLoadError(STAGE_DECODE, "empty file (0 bytes)")
    limit = _effective_max_pixels(max_pixels)
    im = _open(data, limit)
    try:
        _check_size(im.size, limit, min_side)
        try:
            im.load()
        except ImageLoadError:
            raise
        except MemoryError as exc:
            raise ImageLoadError(
                STAGE_DECODE, "not enough memory to decode the image"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, ...
            raise ImageLoadError(
                STAGE_DECODE, f"truncated or corrupt image data ({exc})"
            ) from exc
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001
            raise ImageLoadError(
                STAGE_DECODE, f"unreadable EXIF orientation ({exc})"
            ) from exc
        rgb = _to_rgb(im)
        # Some formats only learn their final size while decoding.
        _check_size(rgb.size, limit, min_side)
        return rgb
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract is: only ImageLoadError escapes
        raise ImageLoadError(
            STAGE_DECODE, f"could not convert the image ({type(exc).__name__}: {exc})"
        ) from exc


def load_image(uri: str, **kwargs: Any) -> Image.Image:
    """Read and decode the image at ``uri``; keyword arguments go to decode_image.

    Raises:
        ImageLoadError: with ``uri`` set, at stage ``read_image`` or ``decode_image``.
    """
    data = read_bytes(uri)
    try:
        return decode_image(data, **kwargs)
    except ImageLoadError as exc:
        raise ImageLoadError(exc.stage, exc.reason, uri) from exc


def load_pixels(uri: str, preprocess: Callable[[Image.Image], Any],
                limits: ImageLimits = ImageLimits()) -> tuple[Any, str, int]:
    """Read, decode and preprocess one image: (pixels, sha256 of the file, file size in bytes).

    Raises:
        ImageLoadError: at stage ``read_image``, ``decode_image`` or ``preprocess_image``.
    """
    data = read_bytes(uri)
    image = decode_image(data, max_pixels=limits.max_pixels, min_side=limits.min_side)
    try:
        pixels = preprocess(image)
    except Exception as exc:  # noqa: BLE001 - a transform failure is this image's failure
        raise ImageLoadError(
            STAGE_PREPROCESS, f"preprocessing failed ({type(exc).__name__}: {exc})", uri
        ) from exc
    return pixels, content_hash(data), len(data)
