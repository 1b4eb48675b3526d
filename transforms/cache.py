"""CachedExtractFeatures: ExtractFeatures that skips images whose features are on disk."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.feature_cache import FeatureCache
from pipeline.model.backbone import BackboneSpec
from transforms.features import ExtractFeatures


class _LookupFn(beam.DoFn):
    def __init__(self, root: str, spec: BackboneSpec) -> None:
        self._root, self._spec = root, spec
        self._hits = Metrics.counter("inctrl", "feature_cache_hits")
        self._misses = Metrics.counter("inctrl", "feature_cache_misses")

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
            yield key, feats


class _StoreFn(beam.DoFn):
    def __init__(self, root: str, spec: BackboneSpec) -> None:
        self._root, self._spec = root, spec

    def setup(self) -> None:
        self._cache = FeatureCache(self._root, self._spec)

    def process(self, element) -> Iterable:
        key, feats = element
        self._cache.put(key[1], feats)
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


def extract_features(cache_root: str | None, spec: BackboneSpec, batch_size: int,
                     share_across_processes: bool = False) -> beam.PTransform:
    """ExtractFeatures, through the disk cache when a cache root is given."""
    if cache_root:
        return CachedExtractFeatures(cache_root, spec, batch_size, share_across_processes)
    return ExtractFeatures(spec, batch_size, share_across_processes)
