"""CachedExtractFeatures: ExtractFeatures that skips images whose features are on disk;
CachedSuiteFeatures, the same for a scoring run whose scorers all read InCTRL's CLIP
features; and CacheFeatures, which loads images and fills the cache (the training job's
extraction). Both read and write the same entries (one per image and CLIP backbone)."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.core.config import default_decode_threads
from pipeline.core.feature_cache import FeatureCache
from pipeline.core.images import ImageLimits
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.backbone import BackboneSpec
from pipeline.model.scorers.suite import CLIP, SuiteSpec, clip_bundle, clip_features
from pipeline.train.data import index_record
from transforms.features import ExtractFeatures, ExtractSuiteFeatures
from transforms.images import LoadImages


def _same(features):
    return features


class _LookupFn(beam.DoFn):
    def __init__(self, root: str, spec: BackboneSpec, wrap=_same) -> None:
        self._root, self._spec, self._wrap = root, spec, wrap
        self._hits = Metrics.counter(METRICS_NAMESPACE, "feature_cache_hits")
        self._misses = Metrics.counter(METRICS_NAMESPACE, "feature_cache_misses")

    def setup(self) -> None:
        self._cache = FeatureCache(self._root, self._spec)

    def process(self, element) -> Iterable:
        key, pixels = element
        feats = self._cache.get(key[1])
        if feats is None:
            self._misses.inc()
            yield beam.pvalue.TaggedOutput("missing", element)
        else:
            self._hits.inc()
            yield key, self._wrap(feats)


class _StoreFn(beam.DoFn):
    def __init__(self, root: str, spec: BackboneSpec, unwrap=_same) -> None:
        self._root, self._spec, self._unwrap = root, spec, unwrap

    def setup(self) -> None:
        self._cache = FeatureCache(self._root, self._spec)

    def process(self, element) -> Iterable:
        key, feats = element
        self._cache.put(key[1], self._unwrap(feats))
        yield element


class CachedExtractFeatures(beam.PTransform):
    """((row, sha256), pixels) → ((row, sha256), ImageFeatures); the backbone runs only on misses."""

    def __init__(self, cache_root: str, spec: BackboneSpec, batch_size: int,
                 share_across_processes: bool = False) -> None:
        super().__init__()
        self._root, self._spec = cache_root, spec
        self._extract = ExtractFeatures(spec, batch_size, share_across_processes)

    def expand(self, keyed_pixels):
        looked = keyed_pixels | "Lookup" >> beam.ParDo(
            _LookupFn(self._root, self._spec)).with_outputs("missing", main="hits")
        fresh = (looked.missing
                 | "Extract" >> self._extract
                 | "Store" >> beam.ParDo(_StoreFn(self._root, self._spec)))
        return (looked.hits, fresh) | "HitsAndFresh" >> beam.Flatten()


class CachedSuiteFeatures(beam.PTransform):
    """((row, sha256), views) → ((row, sha256), TensorBundle) for a run whose every scorer
    reads InCTRL's CLIP features; the backbone runs only on cache misses."""

    def __init__(self, cache_root: str, suite: SuiteSpec, batch_size: int,
                 share_across_processes: bool = False) -> None:
        super().__init__()
        if suite.extractors != (CLIP,):
            raise ValueError(f"the feature cache holds CLIP features only; this run also "
                             f"extracts {[e for e in suite.extractors if e != CLIP]}")
        self._root, self._spec = cache_root, suite.clip
        self._extract = ExtractSuiteFeatures(suite, batch_size, share_across_processes)

    def expand(self, keyed_views):
        looked = keyed_views | "Lookup" >> beam.ParDo(
            _LookupFn(self._root, self._spec, clip_bundle)).with_outputs("missing", main="hits")
        fresh = (looked.missing
                 | "Extract" >> self._extract
                 | "Store" >> beam.ParDo(_StoreFn(self._root, self._spec, clip_features)))
        return (looked.hits, fresh) | "HitsAndFresh" >> beam.Flatten()


def extract_suite_features(cache_root: str | None, suite: SuiteSpec, batch_size: int,
                           share_across_processes: bool = False) -> beam.PTransform:
    """Reference images' ExtractSuiteFeatures (with the extractors' reference
    augmentations), through the disk cache when a cache root is given and every scorer
    reads CLIP features (the cache holds those; other extractors always run)."""
    if cache_root and suite.extractors == (CLIP,):
        return CachedSuiteFeatures(cache_root, suite, batch_size, share_across_processes)
    return ExtractSuiteFeatures(suite, batch_size, share_across_processes, references=True)


class CacheFeatures(beam.PTransform):
    """ManifestRow → ``{'index': index records, 'errors': RowError}``; features go to the cache.

    Images already in the cache are not run through the backbone again (CachedExtractFeatures).
    """

    def __init__(self, cache_root: str, spec: BackboneSpec, batch_size: int,
                 limits: ImageLimits = ImageLimits()) -> None:
        super().__init__()
        self._load = LoadImages(spec, limits, decode_threads=default_decode_threads(spec),
                                prefetch=batch_size)
        self._extract = CachedExtractFeatures(cache_root, spec, batch_size)

    def expand(self, rows):
        images = rows | "LoadImages" >> self._load
        features = images["images"] | "CachedExtractFeatures" >> self._extract
        index = features | "IndexRecords" >> beam.MapTuple(lambda key, _f: index_record(*key))
        return {"index": index, ERRORS: images[ERRORS]}
