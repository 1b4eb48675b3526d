"""AnomalyMaps: each scored query's patch map as an anomaly map of the image itself, written
as files (``--write-anomaly-maps``) and read against the ground-truth mask (pixel metrics).

Per score record (one query, seed and scorer): the scorer's patch map is upsampled to its
model input, smoothed (σ = 4 input pixels) and mapped back through the view's resize and
crop to the image's own size (``pipeline.model.maps``). Then:

- with ``write``: a 16-bit PNG of the map (normalised to the row's ``map_min``/``map_max``)
  and an overlay (the image with the map colour-blended where it is high, normalised per
  image: it shows *where*, the score says *how much*) are written once, in place, under a
  folder unique to the run and to the bundle attempt
  (``OUT/maps/run_date=<date>/run=<key>/dataset=<d>/<attempt>/``); the row gets their URIs.
  Each bundle attempt that succeeds reports itself (an ``ATTEMPT`` element on ``files``),
  and the run's commit names the successful attempts' folders: no map is ever moved, and
  a retried bundle's first attempt is garbage that no record names.
- a query the decision flagged anomalous (``is_anomalous``, DecideAnomalies) with a pixel
  threshold (``pixel_decision_threshold``: from its group's calibration maps) gets its
  defect mask, the pixels strictly above the threshold: ``defect_area_fraction`` and
  ``defect_regions`` (8-connected) on the row, and with ``write`` a binary PNG
  (``<stem>.mask.png``, 255 on defect pixels) in the same attempt folder
  (``defect_mask_uri``).
- with ``pixel``: the map and the mask (``mask_uri``; none for a normal image: all its
  pixels are normal), at most ``PIXEL_SIDE`` pixels on the long side, become mergeable
  pixel histograms per (dataset, category, scorer, k, seed) (``pipeline.core.pixel_metrics``);
  anomalous or unlabelled queries without a mask add nothing. A mask that cannot be read
  or does not match its image is an error row (stage ``read_mask``), not a failed query.
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import uuid
from typing import Iterable

import apache_beam as beam
import numpy as np
import torch
import torch.nn.functional as F
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from pipeline.core.anomaly_images import decode_map_png, encode_map_png, encode_png, overlay
from pipeline.core.calibration import defect_mask, defect_regions
from pipeline.core.config import ScoreConfig
from pipeline.core.images import ImageLoadError, decode_image, read_bytes
from pipeline.core.commit import CommitPlan
from pipeline.core.failures import STAGE_MAP, STAGE_MASK  # error rows that keep their scores
from pipeline.core.layout import MAPS, output_fs
from pipeline.core.manifest import RowError
from pipeline.core.pixel_metrics import (MaskError, PixelStats, aupro, merge_stats, pixel_aupr,
                                         pixel_auroc, pixel_f1_max, pixel_stats, read_mask)
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.maps import anomaly_map
from transforms.errors import error_records
from transforms.write import ATTEMPT

LOG = logging.getLogger(__name__)

PIXEL = "pixel"
FILES = "files"
#: Internal keys of score records that carry what this step needs; never written.
PATCH_MAP_KEY, SIZE_KEY, GRID_KEY = "_patch_map", "_image_size", "_grid"
#: The long side pixel metrics are computed at (maps and masks are resized to it).
PIXEL_SIDE = 256


def map_file_stem(record: dict) -> str:
    """A storable file stem of one (dataset, query, seed, scorer), unique within a bundle
    attempt's folder: a readable part of the image id and a digest of the whole key."""
    key = (f"{record['dataset']}\x00{record['image_id']}\x00{record['seed']}\x00"
           f"{record['scorer']}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(record["image_id"]))[-48:]
    return f"{readable}.{record['seed']}.{record['scorer']}.{digest}"


def record_anomaly_map(suite, record: dict) -> torch.Tensor | None:
    """Pop a score record's internal patch-map keys and return its anomaly map of the image,
    (H, W) at the image's own size, or None when the record has no map (a scorer without
    one, or a run that computes no maps)."""
    patch_map = record.pop(PATCH_MAP_KEY, None)
    size = record.pop(SIZE_KEY, None)
    grid = record.pop(GRID_KEY, None)
    if patch_map is None or size is None:
        return None
    pm = torch.as_tensor(np.asarray(patch_map, dtype=np.float32)).view(*grid)
    geometry = suite.input_geometry(record["scorer"], tuple(grid))
    smooth = suite.smoothing(record["scorer"])
    amap = anomaly_map(pm, geometry, tuple(size), smooth.sigma, smooth.on_original)
    return amap[0] if amap.dim() == 3 else amap


def _resize_long_side(amap: torch.Tensor, mask: np.ndarray | None,
                      side: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) map and mask → at most ``side`` on the long side (bilinear / nearest)."""
    h, w = amap.shape
    scale = side / max(h, w)
    if scale >= 1:
        return amap.numpy(), mask
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0, 0].numpy()
    if mask is not None:
        mask = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=size,
                             mode="nearest")[0, 0].numpy() > 0.5
    return small, mask


class _MapsFn(beam.DoFn):
    def __init__(self, config: ScoreConfig, plan: CommitPlan, *, write: bool,
                 pixel: bool) -> None:
        self._config = config
        self._plan = plan
        self._write = write
        self._pixel = pixel
        self._written = Metrics.counter(METRICS_NAMESPACE, "anomaly_maps_written")
        self._masks = Metrics.counter(METRICS_NAMESPACE, "masks_read")
        self._mask_errors = Metrics.counter(METRICS_NAMESPACE, "mask_errors")
        self._masks_written = Metrics.counter(METRICS_NAMESPACE, "defect_masks_written")

    def setup(self) -> None:
        self._suite = self._config.suite
        self._fs, self._root = output_fs(self._plan.output)

    def start_bundle(self) -> None:
        # Beam retries failed bundles: each attempt writes into a folder of its own.
        self._attempt = uuid.uuid4().hex[:12]
        self._datasets: dict[str | None, None] = {}

    def finish_bundle(self) -> Iterable:
        # Only reached by an attempt that succeeded so far; the runner drops these
        # elements, like every other output, if the bundle fails later.
        for dataset in self._datasets:
            yield beam.pvalue.TaggedOutput(FILES, WindowedValue(
                (ATTEMPT, MAPS, dataset, self._attempt), 0, [GlobalWindow()]))

    def _error(self, record: dict, stage: str, reason: str) -> Iterable:
        error = RowError(image_uri=record.get("image_uri"), dataset=record.get("dataset"),
                         category=record.get("category"), image_id=record.get("image_id"),
                         role="query", stage=stage, reason=reason)
        for rec in error_records(error, (), {record["scorer"]: record.get("model_id")},
                                 self._config.run_id, seed=record["seed"],
                                 scorer=record["scorer"]):
            yield beam.pvalue.TaggedOutput(ERRORS, rec)

    def _pixel_stats(self, record: dict, amap: torch.Tensor) -> Iterable:
        label, mask_uri = record.get("label"), record.get("mask_uri")
        if mask_uri:
            try:
                mask = read_mask(mask_uri, tuple(amap.shape))
            except MaskError as exc:
                self._mask_errors.inc()
                yield from self._error(record, STAGE_MASK, exc.reason)
                return
            self._masks.inc()
        elif label == 0:
            mask = None  # a normal image: every pixel is normal
        else:
            return  # anomalous without a mask, or unlabelled: nothing to measure
        yield beam.pvalue.TaggedOutput(PIXEL, _keyed_stats(record, amap, mask))

    def _files(self, record: dict, amap: torch.Tensor) -> Iterable:
        """Stage the map and the overlay; the record gets their URIs after the commit."""
        try:
            limits = self._config.limits
            image = decode_image(read_bytes(record["image_uri"]), max_pixels=limits.max_pixels,
                                 min_side=limits.min_side)
        except ImageLoadError as exc:  # it was read for scoring moments ago
            yield from self._error(record, STAGE_MAP, exc.reason)
            return
        values = amap.numpy()
        png, lo, hi = encode_map_png(values)
        shown = encode_png(overlay(image.convert("RGB"), values, lo, hi))
        stem = map_file_stem(record)
        folder = self._plan.folder(MAPS, record["dataset"], self._attempt)
        uris = {}
        for kind, data in (("map", png), ("overlay", shown)):
            rel = f"{folder}/{stem}.{kind}.png"
            path = f"{self._root}/{rel}"
            self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self._fs.open(path, "wb") as f:  # a new name: the folder is this attempt's
                f.write(data)
            uris[kind] = f"{self._plan.output.rstrip('/')}/{rel}"
        self._datasets[record["dataset"]] = None
        self._written.inc()
        record.update(anomaly_map_uri=uris["map"], overlay_uri=uris["overlay"], map_min=lo,
                      map_max=hi)

    def _defects(self, record: dict, amap: torch.Tensor) -> None:
        """A query flagged anomalous, with a pixel threshold: its defect mask (the pixels
        strictly above the threshold), measured, and with ``write`` stored as a binary PNG
        beside its map."""
        threshold = record.get("pixel_decision_threshold")
        if not record.get("is_anomalous") or threshold is None:
            return
        mask = defect_mask(amap.numpy(), threshold)
        record.update(defect_area_fraction=float(mask.mean()), defect_regions=defect_regions(mask))
        if not self._write:
            return
        rel = (f"{self._plan.folder(MAPS, record['dataset'], self._attempt)}/"
               f"{map_file_stem(record)}.mask.png")
        path = f"{self._root}/{rel}"
        self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self._fs.open(path, "wb") as f:  # a new name: the folder is this attempt's
            f.write(encode_png(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))))
        self._datasets[record["dataset"]] = None
        self._masks_written.inc()
        record["defect_mask_uri"] = f"{self._plan.output.rstrip('/')}/{rel}"

    def process(self, record: dict) -> Iterable:
        amap = record_anomaly_map(self._suite, record)
        if amap is not None:
            self._defects(record, amap)
            if self._pixel:
                yield from self._pixel_stats(record, amap)
            if self._write:
                yield from self._files(record, amap)
        record.pop("mask_uri", None)
        yield record


def _keyed_stats(record: dict, amap: torch.Tensor, mask: np.ndarray | None) -> tuple:
    """((dataset, category, scorer, k, seed), PixelStats) of one row's (H, W) map."""
    small, mask = _resize_long_side(amap, mask, PIXEL_SIDE)
    key = (record["dataset"], record["category"], record["scorer"], record["k"],
           record["seed"])
    return key, pixel_stats(small, mask)


class _CarriedStatsFn(beam.DoFn):
    """Carried score rows of one (dataset, image_id) with their query's manifest row →
    their pixel statistics, from the maps an earlier run kept (the 16-bit PNG decoded over
    its [map_min, map_max]: within 1/65535 of the range of the map it was written from).
    A row without a map, or whose map or mask cannot be read, adds nothing (its error row,
    if any, was written by the run that scored it)."""

    def __init__(self) -> None:
        self._counted = Metrics.counter(METRICS_NAMESPACE, "carried_maps_measured")
        self._unreadable = Metrics.counter(METRICS_NAMESPACE, "carried_maps_unreadable")

    def process(self, element) -> Iterable:
        _, joined = element
        rows = [r for r in joined["rows"] if r.role == "query"]
        if not rows:
            return
        mask_uri = rows[0].mask_uri
        for record in joined["carried"]:
            uri, lo, hi = (record.get("anomaly_map_uri"), record.get("map_min"),
                           record.get("map_max"))
            if not uri or lo is None or hi is None:
                continue
            try:
                amap = torch.from_numpy(decode_map_png(read_bytes(uri), lo, hi))
                mask = read_mask(mask_uri, tuple(amap.shape)) if mask_uri else None
            except (ImageLoadError, MaskError, OSError, ValueError) as exc:
                LOG.warning("Carried map %s not measured: %s", uri, exc)
                self._unreadable.inc()
                continue
            if mask is None and record.get("label") != 0:
                continue  # anomalous without a mask, or unlabelled: nothing to measure
            self._counted.inc()
            yield _keyed_stats(record, amap, mask)


class CarriedPixelStats(beam.PTransform):
    """``{'carried': carried score records, 'rows': manifest rows}`` → ((dataset, category,
    scorer, k, seed), PixelStats) of the carried rows' kept maps, for AnomalyMaps to merge
    with tonight's (the nightly job's pixel metrics then cover the whole date)."""

    def expand(self, inputs):
        carried = inputs["carried"] | "CarriedById" >> beam.Map(
            lambda r: ((r.get("dataset"), r.get("image_id")), r))
        rows = inputs["rows"] | "RowsById" >> beam.Map(lambda r: ((r.dataset, r.image_id), r))
        return ({"carried": carried, "rows": rows}
                | "JoinCarried" >> beam.CoGroupByKey()
                | "Measure" >> beam.ParDo(_CarriedStatsFn()))


class _MergeStats(beam.CombineFn):
    def create_accumulator(self) -> PixelStats:
        return PixelStats.empty()

    def add_input(self, acc: PixelStats, stats: PixelStats) -> PixelStats:
        return merge_stats(acc, stats)

    def merge_accumulators(self, accs) -> PixelStats:
        accs = list(accs)
        out = accs[0]
        for other in accs[1:]:
            out = merge_stats(out, other)
        return out

    def extract_output(self, acc: PixelStats) -> PixelStats:
        return acc


def _pixel_row(element) -> dict:
    (dataset, category, scorer, k, seed), stats = element
    return {"dataset": dataset, "category": category, "scorer": scorer, "k": k, "seed": seed,
            "pixel_auroc": pixel_auroc(stats), "aupro": aupro(stats),
            "pixel_aupr": pixel_aupr(stats), "pixel_f1_max": pixel_f1_max(stats),
            "pixel_images": stats.images}


class AnomalyMaps(beam.PTransform):
    """Score records (with the internal patch-map keys) → ``{'scores': records with map
    URIs, 'files': the successful bundle attempts that wrote maps (``ATTEMPT`` elements for
    the commit), 'pixel': per (dataset, category, scorer, k, seed) pixel-metric rows,
    'errors': error records}``. ``plan`` is the run's: its key names the maps folder.
    ``carried_stats`` (CarriedPixelStats' output, or None) join the pixel metrics."""

    def __init__(self, config: ScoreConfig, plan: CommitPlan, *, write: bool,
                 pixel: bool, carried_stats=None) -> None:
        super().__init__()
        self._fn = _MapsFn(config, plan, write=write, pixel=pixel)
        self._carried = carried_stats

    def expand(self, records):
        out = records | "Maps" >> beam.ParDo(self._fn).with_outputs(
            PIXEL, FILES, ERRORS, main="scores")
        stats = out[PIXEL]
        if self._carried is not None:
            stats = (stats, self._carried) | "WithCarriedStats" >> beam.Flatten()
        pixel = (stats
                 | "MergePixelStats" >> beam.CombinePerKey(_MergeStats())
                 | "PixelMetrics" >> beam.Map(_pixel_row))
        return {"scores": out.scores, FILES: out[FILES], PIXEL: pixel, ERRORS: out[ERRORS]}
