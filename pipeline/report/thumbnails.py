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
from typing import Iterable, Mapping

import fsspec
import numpy as np
from PIL import Image

from pipeline.core.anomaly_images import outline_mask
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


def thumbnail_name(uri: str, outline: str | None = None) -> str:
    """The thumbnail's path inside the report folder: a hash of the source URI (and of the
    mask outlined on it), so the same image shown twice (a reference of many queries) is
    copied once."""
    key = uri if outline is None else f"{uri}\x00{outline}"
    return f"{IMAGES_DIR}/{hashlib.sha1(key.encode()).hexdigest()[:20]}.png"


def make_thumbnail(data: bytes, size: int = THUMBNAIL_SIZE,
                   outline: bytes | None = None) -> tuple[bytes, int, int]:
    """Image file bytes → PNG bytes of the upright RGB image shrunk to fit ``size`` × ``size``
    (aspect kept; never enlarged), with its width and height. ``outline``: the bytes of a
    binary mask PNG of the image (a defect mask) whose boundary is drawn on the thumbnail.

    Raises:
        ImageLoadError: the bytes are not a decodable image (or the mask is not).
    """
    image = decode_image(data, min_side=1)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    if outline is not None:
        mask = np.asarray(decode_image(outline, min_side=1).convert("L")) > 0
        image = outline_mask(image, mask)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue(), image.width, image.height


def _read(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def _copy(uri: str, report_dir: str, size: int, outline: str | None = None) -> Thumbnail:
    try:
        png, width, height = make_thumbnail(_read(uri), size,
                                            _read(outline) if outline else None)
    except (OSError, ValueError, ImageLoadError) as exc:
        reason = exc.reason if isinstance(exc, ImageLoadError) else f"{type(exc).__name__}: {exc}"
        LOG.warning("Report: image %s left out (%s)", uri, reason)
        return Thumbnail(uri, None, problem=reason)
    name = thumbnail_name(uri, outline)
    with fsspec.open(f"{report_dir.rstrip('/')}/{name}", "wb") as f:
        f.write(png)
    return Thumbnail(uri, name, width, height)


def copy_thumbnails(uris: Iterable[str], report_dir: str, *, size: int = THUMBNAIL_SIZE,
                    threads: int = READ_THREADS,
                    outlines: Mapping[str, str] | None = None) -> dict[str, Thumbnail]:
    """Thumbnails of every distinct URI in ``uris`` under ``report_dir/images/``, keyed by
    source URI; ``outlines`` maps a URI to the mask PNG whose boundary its thumbnail shows
    (a flagged query's defect mask on its overlay). The folder must exist (object stores
    need none)."""
    outlines = dict(outlines or {})
    distinct = sorted({u for u in uris if u})
    if not distinct:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(distinct)))) as pool:
        copies = list(pool.map(lambda uri: _copy(uri, report_dir, size, outlines.get(uri)),
                               distinct))
    missing = sum(c.path is None for c in copies)
    LOG.info("Report: %d image thumbnails copied, %d unreadable", len(copies) - missing, missing)
    return {c.source: c for c in copies}
