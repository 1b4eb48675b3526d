"""Ground-truth masks while a manifest is built: each mask's size against its image's (read
from the file headers only), and the union of several masks of one image (MVTec LOCO AD
keeps one PNG per defect region) written as one mask.

A union is read with the scoring job's own rule (``pixel_metrics.read_mask``: any nonzero
pixel is defective) and written as 0/255 in a grayscale PNG.
"""
from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.datasets.base import MaskCheck, Tree
from pipeline.core.pixel_metrics import MaskError, read_mask

LOG = logging.getLogger(__name__)

#: Header reads run in parallel: on an object store each is a round trip.
_THREADS = 16


class _Unreadable(Exception):
    """A file whose image header cannot be read."""


def _size(tree: Tree, path: str) -> tuple[int, int]:
    """(width, height) from the image's header."""
    try:
        with tree.fs.open(path, "rb") as f, Image.open(f) as image:
            return image.size
    except UnidentifiedImageError as exc:  # its message names the file object, not the file
        raise _Unreadable("not an image format PIL reads") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _Unreadable(f"{type(exc).__name__}: {exc}") from exc


def _check(tree: Tree, check: MaskCheck) -> list[tuple[str, str, str]]:
    """Problems of one image and its masks, as (kind, file, detail); also sets the row's
    ``mask_uri`` to the union of several masks once they are known to be good."""
    found: list[tuple[str, str, str]] = []
    image_size: Optional[tuple[int, int]] = None
    if check.image_readable:  # else it is reported already
        try:
            image_size = _size(tree, check.image)
        except _Unreadable as exc:
            found.append(("unreadable", check.image, f"cannot read the image's size ({exc}); "
                          "kept, the job will report it; its mask's size is not checked"))
    bad = []
    for mask in check.masks:
        try:
            size = _size(tree, mask)
        except _Unreadable as exc:
            found.append(("unreadable", mask, f"unreadable mask ({exc}); kept, the job will "
                          "report it"))
            bad.append(mask)
            continue
        if image_size is not None and size != image_size:
            found.append(("mask_size", mask, f"mask is {size[0]}x{size[1]} (WxH), its image "
                          f"{tree.uri(check.image)} is {image_size[0]}x{image_size[1]}; kept, "
                          "the job will report it"))
            bad.append(mask)
    if len(check.masks) > 1:
        if bad or image_size is None:
            # The row points at a mask the job will refuse, so the problem shows per row.
            check.row["mask_uri"] = tree.uri(bad[0] if bad else check.masks[0])
            return found
        try:
            check.row["mask_uri"] = _write_union(tree, check, image_size)
        except MaskError as exc:
            found.append(("unreadable", check.masks[0], f"{exc.reason}; kept, the job will "
                          "report it"))
            check.row["mask_uri"] = tree.uri(check.masks[0])
    return found


def _write_union(tree: Tree, check: MaskCheck, image_size: tuple[int, int]) -> str:
    """Write the union of the image's masks (the job's rule: any nonzero pixel is defective)
    as 0/255 grayscale at ``check.combined``; returns that URI."""
    width, height = image_size
    union = np.logical_or.reduce([read_mask(tree.uri(m), (height, width)) for m in check.masks])
    target = check.combined
    if target is None:
        raise ValueError(f"{tree.uri(check.image)} has {len(check.masks)} masks and no place "
                         "to write their union")
    fs, path = fsspec.core.url_to_fs(target)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        Image.fromarray(np.where(union, 255, 0).astype(np.uint8), mode="L").save(f, format="PNG")
    return target


def check_masks(tree: Tree, checks: list[MaskCheck]) -> None:
    """Compare every mask's size with its image's and write the unions of several masks;
    each problem becomes one warning and one count in the tree's tally."""
    if not checks:
        return
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(checks))) as pool:
        results = list(pool.map(lambda c: _check(tree, c), checks))
    for found in results:
        for kind, path, detail in found:
            tree.problems.add(kind, tree.uri(path), detail)
