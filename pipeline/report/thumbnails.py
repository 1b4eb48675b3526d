"""Copies of the gallery's images into the report folder, as small PNG thumbnails.

The report must open from a file share or a downloaded folder, where the scored images' own
URIs (``gs://``, another machine's disk) do not resolve, so every image it shows is read
through fsspec, decoded the way the job decodes it (:func:`pipeline.core.images.decode_image`)
and written as a PNG of at most :data:`THUMBNAIL_SIZE` pixels a side beside ``index.html``.
An image that cannot be read is logged and left out (the page says so), never fatal.
"""
from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import fsspec
from PIL import Image

from pipeline.core.images import ImageLoadError, decode_image

LOG = logging.getLogger(__name__)

THUMBNAIL_SIZE = 256
IMAGES_DIR = "images"
#: Images read at once: object-store reads are latency-bound.
READ_THREADS = 8


@dataclass(frozen=True)
class Thumbnail:
    """One source image's copy in the report: ``path`` relative to the report folder, or
    None with the ``problem`` that kept it out."""

    source: str
    path: str | None
    width: int = 0
    height: int = 0
    problem: str | None = None


def thumbnail_name(uri: str) -> str:
    """The thumbnail's path inside the report folder: a hash of the source URI, so the same
    image shown twice (a reference of many queries) is copied once."""
    return f"{IMAGES_DIR}/{hashlib.sha1(uri.encode()).hexdigest()[:20]}.png"


def make_thumbnail(data: bytes, size: int = THUMBNAIL_SIZE) -> tuple[bytes, int, int]:
    """Image file bytes → PNG bytes of the upright RGB image shrunk to fit ``size`` × ``size``
    (aspect kept; never enlarged), with its width and height.

    Raises:
        ImageLoadError: the bytes are not a decodable image.
    """
    image = decode_image(data, min_side=1)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), image.width, image.height


def _copy(uri: str, report_dir: str, size: int) -> Thumbnail:
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
        png, width, height = make_thumbnail(data, size)
    except (OSError, ValueError, ImageLoadError) as exc:
        reason = exc.reason if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
        LOG.warning("Report: image %s left out (%s)", uri, reason)
        return Thumbnail(uri, None, problem=reason)
    name = thumbnail_name(uri)
    with fsspec.open(f"{report_dir.rstrip('/')}/{name}", "wb") as f:
        f.write(png)
    return Thumbnail(uri, name, width, height)


def copy_thumbnails(uris: Iterable[str], report_dir: str, *, size: int = THUMBNAIL_SIZE,
                    threads: int = READ_THREADS) -> dict[str, Thumbnail]:
    """Thumbnails of every distinct URI in ``uris`` under ``report_dir/images/``, keyed by
    source URI. The folder must exist (object stores need none)."""
    distinct = sorted({u for u in uris if u})
    if not distinct:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(distinct)))) as pool:
        copies = list(pool.map(lambda uri: _copy(uri, report_dir, size), distinct))
    missing = sum(c.path is None for c in copies)
    LOG.info("Report: %d image thumbnails copied, %d unreadable", len(copies) - missing, missing)
    return {c.source: c for c in copies}
