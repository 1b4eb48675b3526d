"""LoadImages: manifest rows → preprocessed pixel tensors, or error rows with a reason.

Reading, decoding and preprocessing can run on a per-process thread pool (``decode_threads``
> 1): Pillow's decoders and resampling, hashlib and torch release the GIL, so the threads
decode in parallel and, in a fused stage, while the model runs on the GPU. Rows come out in
the order they went in, metrics are counted on the bundle's own thread, and every row
still in flight when a bundle ends is emitted in ``finish_bundle``.
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.core.images import ImageLimits, ImageLoadError, load_pixels
from pipeline.core.manifest import ManifestRow, RowError
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.suite import SuiteSpec, suite_preprocess
from transforms.errors import row_error
from transforms.features import KeyedBundle

@dataclass(frozen=True)
class Loaded:
    """One row's outcome: pixels (3, H, W) or a bundle of views, and the file's sha256, or
    the error row."""

    row: ManifestRow
    pixels: torch.Tensor | object | None = None
    sha256: str | None = None
    nbytes: int = 0
    error: RowError | None = None


def load_row(row: ManifestRow, preprocess: Callable, limits: ImageLimits) -> Loaded:
    """Read, decode and preprocess one image; every per-image failure becomes ``error``."""
    try:
        pixels, sha256, nbytes = load_pixels(row.image_uri, preprocess, limits)
    except ImageLoadError as exc:
        return Loaded(row, error=row_error(row, exc.stage, exc.reason))
    return Loaded(row, pixels, sha256, nbytes)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def decode_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per process and size, shared by every DoFn instance (and SDK thread) in it."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="inctrl-decode")
        return pool


class _LoadFn(beam.DoFn):
    """Reads, decodes and preprocesses images with the backbone's own transform (or, for a
    run's scorers, each view's transform of the one decoded image).

    ``threads`` 1 decodes inline; more decode on a shared pool with up to ``prefetch`` rows
    of a bundle in flight (enough to keep decoding while a batch runs through the model).
    """

    def __init__(self, spec: SuiteSpec, limits: ImageLimits = ImageLimits(),
                 threads: int = 1, prefetch: int = 0) -> None:
        if threads < 1:
            raise ValueError(f"decode threads must be at least 1, got {threads}")
        self._spec = spec
        self._limits = limits
        self._threads = threads
        self._prefetch = max(prefetch, 2 * threads)
        self._loaded = Metrics.counter(METRICS_NAMESPACE, "images_loaded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "images_failed")
        self._bytes = Metrics.distribution(METRICS_NAMESPACE, "image_bytes")

    def setup(self) -> None:
        self._preprocess = suite_preprocess(self._spec)
        self._pool = decode_pool(self._threads) if self._threads > 1 else None

    def start_bundle(self) -> None:
        self._pending: collections.deque[tuple[Future, object, object]] = collections.deque()

    def _load(self, row: ManifestRow) -> Loaded:
        return load_row(row, self._preprocess, self._limits)

    def _outputs(self, loaded: Loaded) -> Iterator:
        """Count one outcome (on the bundle's thread) and give its main or error output."""
        if loaded.error is not None:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, loaded.error)
            return
        self._loaded.inc()
        self._bytes.update(loaded.nbytes)
        yield (loaded.row, loaded.sha256), loaded.pixels

    def _emit(self, keep: int) -> Iterator:
        """Emit finished rows in input order until at most ``keep`` are in flight."""
        while self._pending and (len(self._pending) > keep or self._pending[0][0].done()):
            future, timestamp, window = self._pending.popleft()
            for out in self._outputs(future.result()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(
                        out.tag, WindowedValue(out.value, timestamp, (window,)))
                else:
                    yield WindowedValue(out, timestamp, (window,))

    def process(self, row: ManifestRow, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam) -> Iterable:
        if self._pool is None:
            yield from self._outputs(self._load(row))
            return
        self._pending.append((self._pool.submit(self._load, row), timestamp, window))
        yield from self._emit(keep=self._prefetch)

    def finish_bundle(self) -> Iterable:
        yield from self._emit(keep=0)


def _group_chunks(element: tuple, size: int) -> Iterator[list[ManifestRow]]:
    """One group's rows as lists of up to ``size`` rows, streamed (never all in memory)."""
    _, rows = element
    chunk: list[ManifestRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class SpreadByGroup(beam.PTransform):
    """Rows → the same rows after a fusion break, each (dataset, category)'s rows consecutive
    in chunks of up to ``chunk`` rows; the chunks, not the rows, are spread over workers.

    Downstream batches then hold one group (two at a chunk's end) however the manifest is
    ordered, so a worker prepares each group's references once instead of once per batch
    that happens to hold one of its queries.
    """

    def __init__(self, chunk: int) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 row, got {chunk}")
        self._chunk = chunk

    def expand(self, rows):
        return (rows
                | "KeyByGroup" >> beam.Map(lambda r: ((r.dataset, r.category), r))
                | "GroupRows" >> beam.GroupByKey()
                | "Chunk" >> beam.FlatMap(_group_chunks, self._chunk)
                | "SpreadChunks" >> beam.Reshuffle()
                | "Rows" >> beam.FlatMap(lambda chunk: chunk).with_output_types(ManifestRow))


class LoadImages(beam.PTransform):
    """ManifestRow → ``{'images': ((row, sha256), pixels (3, H, W)), 'errors': RowError}``;
    for a SuiteSpec the pixels are a TensorBundle of views (one decode, a transform per view).

    ``decode_threads`` read and decode per worker process, with up to ``prefetch`` rows in
    flight (a batch's worth keeps decoding while the model runs). ``group_chunk`` > 0 keeps
    each (dataset, category)'s rows together in chunks of that many (``SpreadByGroup``: for
    the query path, whose batches are scored per group); 0 spreads rows one by one
    (references, training extraction).
    """

    def __init__(self, spec: SuiteSpec, limits: ImageLimits = ImageLimits(), *,
                 decode_threads: int = 1, prefetch: int = 0, group_chunk: int = 0) -> None:
        super().__init__()
        self._fn = _LoadFn(spec, limits, decode_threads, prefetch)
        self._type = KeyedBundle
        self._group_chunk = group_chunk

    def expand(self, rows):
        # A fusion break on the (small) rows: decoding, the backbone and scoring then run in
        # one stage, so pixels and features stream through it batch by batch instead of
        # being materialised between stages (the runner would otherwise cut the fused chain
        # just before the first transform that reads a side input built from these rows),
        # and a runner can spread the expensive per-image work over its workers.
        spread = SpreadByGroup(self._group_chunk) if self._group_chunk else beam.Reshuffle()
        out = (rows
               | "SpreadRows" >> spread
               | "Load" >> beam.ParDo(self._fn).with_output_types(self._type)
               .with_outputs(ERRORS, main="images"))
        return {"images": out.images, ERRORS: out[ERRORS]}
