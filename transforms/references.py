"""PrepareReferences: each group's few-shot normal references, drawn, loaded and extracted.

Its steps: SelectReferences (the draw per group and seed), LoadImages and feature extraction
once per drawn image, AssembleReferenceSets (the features stacked per group and seed).

The draw itself is ``pipeline.core.sampling`` (seeded hash ranks, the same on any runner).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import ManifestRow
from pipeline.core.sampling import sampler_rank
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.suite import TensorBundle
from transforms.cache import extract_suite_features
from transforms.errors import row_error
from transforms.images import LoadImages

STAGE_SELECT = "select_references"

GroupKey = tuple[str, str, int]  # (dataset, category, seed)


@dataclass
class ReferencePayload:
    """A group's loaded references: ids in draw order and their stacked features."""

    image_ids: tuple[str, ...]
    features: TensorBundle  # every extractor's Features of the k images, batch k
    selected: int  # how many the sampler drew (some may have failed to load)
    image_uris: tuple[str, ...] = ()  # in the order of image_ids


class _SplitReferencesFn(beam.DoFn):
    def process(self, row: ManifestRow) -> Iterable:
        if row.role != "reference":
            return
        if row.label == 1:
            yield beam.pvalue.TaggedOutput(ERRORS, row_error(
                row, STAGE_SELECT, "reference images must be normal (label 0 or null), this one "
                "is labelled anomalous"))
            return
        yield row


class SelectReferences(beam.PTransform):
    """ManifestRow → ``{'sets': ((dataset, category, seed), rows in draw order), 'errors': ...}``."""

    def __init__(self, k: int, seeds: Sequence[int]) -> None:
        super().__init__()
        self._k = k
        self._seeds = tuple(seeds)

    def expand(self, rows):
        seeds = self._seeds
        split = rows | "OnlyNormalReferences" >> beam.ParDo(_SplitReferencesFn()).with_outputs(
            ERRORS, main="refs")
        sets = (
            split.refs
            | "RankPerSeed" >> beam.FlatMap(lambda r: [
                ((r.dataset, r.category, s),
                 (sampler_rank(s, r.dataset, r.category, r.image_id), r.image_uri, r))
                for s in seeds])
            | "DrawK" >> beam.combiners.Top.SmallestPerKey(self._k)
            | "InDrawOrder" >> beam.MapTuple(lambda key, ranked: (key, tuple(x[2] for x in ranked)))
        )
        return {"sets": sets, ERRORS: split[ERRORS]}


def distinct_references(sets) -> "beam.PCollection":
    """Each drawn reference once, however many seeds drew it: PCollection[ManifestRow]."""
    return (
        sets
        | "ReferenceRows" >> beam.FlatMap(lambda kv: [(r.image_id, r) for r in kv[1]])
        | "OncePerImage" >> beam.CombinePerKey(lambda rows: next(iter(rows)))
        | "DropIds" >> beam.Values()
    )


class _StackFn(beam.DoFn):
    def __init__(self) -> None:
        self._sets = Metrics.counter(METRICS_NAMESPACE, "reference_sets_built")

    def process(self, element) -> Iterable:
        key, members = element
        members = sorted(members, key=lambda m: m[0])  # draw order
        selected = members[0][3] if members else 0
        self._sets.inc()
        yield key, ReferencePayload(
            image_ids=tuple(m[1] for m in members),
            features=TensorBundle.cat([m[2] for m in members]),
            selected=selected,
            image_uris=tuple(m[4] for m in members),
        )


class AssembleReferenceSets(beam.PTransform):
    """Joins drawn sets with extracted features: ((dataset, category, seed), ReferencePayload).

    Input: ``{'sets': ..., 'features': (ManifestRow, TensorBundle)}``. References that failed to
    load are left out (their error rows come from LoadImages); a group left with none is absent.
    """

    def expand(self, inputs):
        members = inputs["sets"] | "Memberships" >> beam.FlatMap(lambda kv: [
            (row.image_id, (kv[0], position, len(kv[1]), row.image_uri))
            for position, row in enumerate(kv[1])])
        feats = inputs["features"] | "FeaturesById" >> beam.MapTuple(
            lambda row, f: (row.image_id, f))
        return (
            {"members": members, "features": feats}
            | "JoinById" >> beam.CoGroupByKey()
            | "ToGroups" >> beam.FlatMap(_to_groups)
            | "GroupSets" >> beam.GroupByKey()
            | "Stack" >> beam.ParDo(_StackFn())
        )


def _to_groups(element) -> Iterable:
    image_id, joined = element
    features = list(joined["features"])
    if not features:
        return
    for key, position, selected, uri in joined["members"]:
        yield key, (position, image_id, features[0], selected, uri)


def _row_features(key: tuple, features: TensorBundle) -> tuple[ManifestRow, TensorBundle]:
    """((row, sha256), features) → (row, features)."""
    return key[0], features


class PrepareReferences(beam.PTransform):
    """Manifest rows → each group's few-shot references, drawn, loaded and extracted once.

    Returns ``{'sets': ((dataset, category, seed), ReferencePayload), 'errors': RowError}``:
    draw k normal references per group and seed (rows for which ``candidate(row)`` is true),
    load each drawn image once however many seeds drew it, extract the features of every
    extractor the run's scorers read (through the feature cache when
    ``config.feature_cache`` is set and they all read CLIP's) and stack them per group.
    With k = 0 (zero-shot) nothing is drawn: both outputs are empty.
    """

    def __init__(self, config: ScoreConfig, candidate=None) -> None:
        super().__init__()
        self._config = config
        self._candidate = candidate

    def expand(self, rows):
        cfg = self._config
        if cfg.k == 0:
            return {"sets": rows | "NoSets" >> beam.Filter(lambda _: False),
                    ERRORS: rows | "NoErrors" >> beam.Filter(lambda _: False)}
        if self._candidate is not None:
            rows = rows | "Candidates" >> beam.Filter(self._candidate)
        drawn = rows | "SelectReferences" >> SelectReferences(cfg.k, cfg.seeds)
        images = (distinct_references(drawn["sets"])
                  | "LoadReferenceImages" >> LoadImages(
                      cfg.suite, cfg.limits, decode_threads=cfg.decode_thread_count,
                      prefetch=cfg.batch_size))
        features = (images["images"]
                    | "ExtractReferenceFeatures" >> extract_suite_features(
                        cfg.feature_cache, cfg.suite, cfg.batch_size,
                        cfg.share_model_across_processes)
                    | "RowOnly" >> beam.MapTuple(_row_features))
        sets = ({"sets": drawn["sets"], "features": features}
                | "AssembleReferenceSets" >> AssembleReferenceSets())
        errors = (drawn[ERRORS], images[ERRORS]) | "MergeErrors" >> beam.Flatten()
        return {"sets": sets, ERRORS: errors}
