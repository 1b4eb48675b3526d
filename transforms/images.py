"""LoadImages: manifest rows → preprocessed pixel tensors, or error rows with a reason."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.images import ImageLoadError, content_hash, decode_image, read_bytes
from pipeline.manifest import ManifestRow
from pipeline.model.backbone import BackboneSpec, describe
from transforms.errors import ERRORS, row_error
from transforms.features import KeyedPixels

STAGE_PREPROCESS = "preprocess_image"


class _LoadFn(beam.DoFn):
    """Reads, decodes and preprocesses one image with the backbone's own transform."""

    def __init__(self, spec: BackboneSpec, max_pixels: int, min_side: int) -> None:
        self._spec = spec
        self._max_pixels = max_pixels
        self._min_side = min_side
        self._loaded = Metrics.counter("inctrl", "images_loaded")
        self._failed = Metrics.counter("inctrl", "images_failed")
        self._bytes = Metrics.distribution("inctrl", "image_bytes")

    def setup(self) -> None:
        self._preprocess = describe(self._spec).preprocess

    def process(self, row: ManifestRow) -> Iterable:
        try:
            data = read_bytes(row.image_uri)
            image = decode_image(data, max_pixels=self._max_pixels, min_side=self._min_side)
        except ImageLoadError as exc:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, row_error(row, exc.stage, exc.reason))
            return
        try:
            pixels = self._preprocess(image)
        except Exception as exc:  # a transform failure must not kill the bundle
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, row_error(
                row, STAGE_PREPROCESS, f"preprocessing failed ({type(exc).__name__}: {exc})"))
            return
        self._loaded.inc()
        self._bytes.update(len(data))
        yield (row, content_hash(data)), pixels


class LoadImages(beam.PTransform):
    """ManifestRow → ``{'images': ((row, sha256), pixels (3, H, W)), 'errors': RowError}``."""

    def __init__(self, spec: BackboneSpec, max_pixels: int, min_side: int) -> None:
        super().__init__()
        self._fn = _LoadFn(spec, max_pixels, min_side)

    def expand(self, rows):
        # A fusion break on the (small) rows: decoding, the backbone and scoring then run in
        # one stage, so pixels and features stream through it batch by batch instead of
        # being materialised between stages (the runner would otherwise cut the fused chain
        # just before the first transform that reads a side input built from these rows),
        # and a runner can spread the expensive per-image work over its workers.
        out = (rows
               | "SpreadRows" >> beam.Reshuffle()
               | "Load" >> beam.ParDo(self._fn).with_output_types(KeyedPixels)
               .with_outputs(ERRORS, main="images"))
        return {"images": out.images, ERRORS: out[ERRORS]}
