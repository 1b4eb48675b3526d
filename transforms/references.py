"""SelectReferences and AssembleReferenceSets: few-shot normal references per group and seed.

The sampler ranks each candidate by a hash of (seed, dataset, category, image_id) and keeps
the k smallest: the same draw on any runner, any number of workers and any input order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.manifest import ManifestRow
from pipeline.model.backbone import ImageFeatures
from transforms.errors import ERRORS, row_error

STAGE_SELECT = "select_references"

GroupKey = tuple[str, str, int]  # (dataset, category, seed)


def sampler_rank(seed: int, dataset: str, category: str, image_id: str) -> str:
    """Position of a candidate in the seeded draw; smaller ranks are drawn first."""
    return hashlib.sha256(f"{seed}\x1f{dataset}\x1f{category}\x1f{image_id}".encode()).hexdigest()


def draw_references(candidates: Sequence[ManifestRow], seed: int, k: int) -> list[ManifestRow]:
    """The k references a seed draws from one group's candidates (pure reference version)."""
    ranked = sorted(candidates, key=lambda r: sampler_rank(seed, r.dataset, r.category, r.image_id))
    return ranked[:k]


@dataclass
class ReferencePayload:
    """A group's loaded references: ids in draw order and their stacked features."""

    image_ids: tuple[str, ...]
    features: ImageFeatures  # tokens (k, layers, patches, width), embeds (k, embed_dim)
    selected: int  # how many the sampler drew (some may have failed to load)


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
        self._sets = Metrics.counter("inctrl", "reference_sets_built")

    def process(self, element) -> Iterable:
        key, members = element
        members = sorted(members, key=lambda m: m[0])  # draw order
        selected = members[0][3] if members else 0
        self._sets.inc()
        yield key, ReferencePayload(
            image_ids=tuple(m[1] for m in members),
            features=ImageFeatures.cat([m[2] for m in members]),
            selected=selected,
        )


class AssembleReferenceSets(beam.PTransform):
    """Joins drawn sets with extracted features: ((dataset, category, seed), ReferencePayload).

    Input: ``{'sets': ..., 'features': (ManifestRow, ImageFeatures)}``. References that failed to
    load are left out (their error rows come from LoadImages); a group left with none is absent.
    """

    def expand(self, inputs):
        members = inputs["sets"] | "Memberships" >> beam.FlatMap(lambda kv: [
            (row.image_id, (kv[0], position, len(kv[1]))) for position, row in enumerate(kv[1])])
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
    for key, position, selected in joined["members"]:
        yield key, (position, image_id, features[0], selected)
