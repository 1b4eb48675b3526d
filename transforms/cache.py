"""CachedSuiteFeatures: fills the feature cache for any extractors, running them only on
images whose features are not on disk yet (``pipeline.core.feature_cache``: one entry per
image and extractor identity); and CacheFeatures, which loads images and fills the cache
with InCTRL's CLIP features (the training job's extraction: the same entries scoring runs
read).

Only the images' keys come out of either: the features stay in the cache, and whoever needs
them reads them there. A runner may hold a whole PCollection in memory (the FnApiRunner
materialises every Flatten, and everything crossing a GroupByKey), so a PCollection of
features would make a local run's memory grow with the images extracted (issue 22)."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.core.config import default_decode_threads
from pipeline.core.feature_cache import FeatureCache
from pipeline.core.images import ImageLimits
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.backbone import BackboneSpec
from pipeline.model.scorers.inctrl import INCTRL
from pipeline.model.scorers.registry import extractor_entry
from pipeline.model.scorers.suite import SuiteSpec
from pipeline.train.data import index_record
from transforms.features import ExtractSuiteFeatures
from transforms.images import LoadImages


def cache_identities(suite: SuiteSpec, references: bool) -> dict[str, str]:
    """Each extractor's cache identity: its features' identity, marked for reference images
    when it extracts augmentations of them (their entries hold more)."""
    out = {}
    for ext in suite.extractors:
        spec = suite.extractor_spec(ext)
        entry = extractor_entry(ext)
        identity = entry.identity(spec)
        if references and entry.augments_references(spec):
            identity += "|references"
        out[ext] = identity
    return out


class _LookupFn(beam.DoFn):
    """An image whose every extractor's features are cached (and readable) becomes its key
    (``hits``); the others go on to extraction (``missing``)."""

    def __init__(self, root: str, identities: dict[str, str]) -> None:
        self._root, self._identities = root, identities
        self._hits = Metrics.counter(METRICS_NAMESPACE, "feature_cache_hits")
        self._misses = Metrics.counter(METRICS_NAMESPACE, "feature_cache_misses")

    def setup(self) -> None:
        self._caches = {ext: FeatureCache(self._root, identity)
                        for ext, identity in self._identities.items()}

    def process(self, element) -> Iterable:
        key, _views = element
        for cache in self._caches.values():
            # Read, not only looked up: an unreadable entry is extracted and written again.
            if cache.get(key[1]) is None:
                self._misses.inc()
                yield beam.pvalue.TaggedOutput("missing", element)
                return
        self._hits.inc()
        yield key


class _StoreFn(beam.DoFn):
    """(key, features) → key, once every extractor's features are in the cache."""

    def __init__(self, root: str, identities: dict[str, str]) -> None:
        self._root, self._identities = root, identities

    def setup(self) -> None:
        self._caches = {ext: FeatureCache(self._root, identity)
                        for ext, identity in self._identities.items()}

    def process(self, element) -> Iterable:
        key, feats = element
        for ext, cache in self._caches.items():
            cache.put(key[1], feats.part(ext))
        yield key


class CachedSuiteFeatures(beam.PTransform):
    """((row, sha256), views) → ``{'stored': (row, sha256), 'errors': RowError}``: the key of
    every image whose features are all in the cache afterwards; the extractors run only on
    images whose features are not all cached, and store theirs. ``references``: reference
    images (extractors add their augmentations, cached apart).

    The features are dropped in the stage that read or computed them: the cached images and
    the fresh ones meet as keys (a Flatten of features would be held whole by a local
    runner)."""

    def __init__(self, cache_root: str, suite: SuiteSpec, batch_size: int,
                 share_across_processes: bool = False, references: bool = False) -> None:
        super().__init__()
        self._root = cache_root
        self._identities = cache_identities(suite, references)
        self._extract = ExtractSuiteFeatures(suite, batch_size, share_across_processes,
                                             references=references)

    def expand(self, keyed_views):
        looked = keyed_views | "Lookup" >> beam.ParDo(
            _LookupFn(self._root, self._identities)).with_outputs("missing", main="hits")
        extracted = looked.missing | "Extract" >> self._extract
        fresh = extracted["features"] | "Store" >> beam.ParDo(
            _StoreFn(self._root, self._identities))
        return {"stored": (looked.hits, fresh) | "HitsAndFresh" >> beam.Flatten(),
                ERRORS: extracted[ERRORS]}


def clip_suite(spec: BackboneSpec) -> SuiteSpec:
    """The run that extracts InCTRL's CLIP features only (training)."""
    return SuiteSpec((INCTRL,), clip=spec)


class CacheFeatures(beam.PTransform):
    """ManifestRow → ``{'index': index records, 'errors': RowError}``; InCTRL's CLIP features
    of every image go to the cache (images already there are not run again)."""

    def __init__(self, cache_root: str, spec: BackboneSpec, batch_size: int,
                 limits: ImageLimits = ImageLimits()) -> None:
        super().__init__()
        suite = clip_suite(spec)
        self._load = LoadImages(suite, limits, decode_threads=default_decode_threads(spec),
                                prefetch=batch_size)
        self._extract = CachedSuiteFeatures(cache_root, suite, batch_size)

    def expand(self, rows):
        images = rows | "LoadImages" >> self._load
        features = images["images"] | "CachedExtractFeatures" >> self._extract
        index = features["stored"] | "IndexRecords" >> beam.MapTuple(index_record)
        errors = (images[ERRORS], features[ERRORS]) | "AllErrors" >> beam.Flatten()
        return {"index": index, ERRORS: errors}
