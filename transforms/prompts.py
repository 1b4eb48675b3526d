"""EncodePrompts: the text prior's prompt embeddings, computed once per category."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.model.backbone import BackboneSpec, get_backbone
from pipeline.model.inctrl import build_text_features


class _EncodeFn(beam.DoFn):
    def __init__(self, spec: BackboneSpec, semantic_classes: frozenset[str]) -> None:
        self._spec = spec
        self._semantic = semantic_classes
        self._encoded = Metrics.counter("inctrl", "prompt_sets_encoded")

    def setup(self) -> None:
        self._backbone = get_backbone(self._spec)

    def process(self, category: str) -> Iterable:
        self._encoded.inc()
        yield category, build_text_features(self._backbone, category, self._semantic).cpu()


class EncodePrompts(beam.PTransform):
    """ManifestRow → (category, (2, embed_dim) normal/anomalous text features), once each."""

    def __init__(self, spec: BackboneSpec, semantic_classes: frozenset[str]) -> None:
        super().__init__()
        self._fn = _EncodeFn(spec, semantic_classes)

    def expand(self, rows):
        return (
            rows
            | "Categories" >> beam.Map(lambda r: r.category)
            | "Distinct" >> beam.Distinct()
            | "Encode" >> beam.ParDo(self._fn)
        )
