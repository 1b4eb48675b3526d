"""PrepareReferences: each group's few-shot normal references, drawn or chosen, loaded and
extracted.

Its steps: SelectReferences (the draw per group and seed: k candidates, or with
``representative`` selection the pool), LoadImages and feature extraction once per drawn
image, AssembleReferenceSets (the features stacked per group and seed; with
``representative``, each extractor's k chosen from the pool by k-medoids in its own
descriptor space, ``pipeline.model.scorers.references``).

The draw itself is ``pipeline.core.sampling`` (seeded hash ranks, the same on any runner).
With a feature cache, a pool's choice is kept (``SelectionCache``): the next run of the same
pool loads and extracts only the chosen images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics

from pipeline.core.config import ScoreConfig
from pipeline.core.feature_cache import SelectionCache, selection_key
from pipeline.core.manifest import ManifestRow
from pipeline.core.sampling import sampler_rank
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.references import choose_representative
from pipeline.model.scorers.suite import SuiteSpec, TensorBundle
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
    # representative selection: each extractor's own k (ids and URIs), its features' order
    chosen: dict[str, tuple[tuple[str, str], ...]] | None = None

    def ids_for(self, extractor: str) -> tuple[str, ...]:
        if self.chosen is not None and extractor in self.chosen:
            return tuple(i for i, _ in self.chosen[extractor])
        return self.image_ids

    def uris_for(self, extractor: str) -> tuple[str, ...]:
        if self.chosen is not None and extractor in self.chosen:
            return tuple(u for _, u in self.chosen[extractor])
        return self.image_uris


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


def _in_draw_order(key, ranked) -> tuple:
    return key, tuple(x[2] for x in sorted(ranked, key=lambda x: (x[0], x[1])))


class SelectReferences(beam.PTransform):
    """ManifestRow → ``{'sets': ((dataset, category, seed), rows in draw order), 'errors': ...}``;
    ``k`` rows per group and seed, or every candidate when ``k`` is None (a whole pool)."""

    def __init__(self, k: int | None, seeds: Sequence[int]) -> None:
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
        )
        drawn = (sets | "DrawK" >> beam.combiners.Top.SmallestPerKey(self._k)
                 if self._k is not None else sets | "WholePool" >> beam.GroupByKey())
        sets = drawn | "InDrawOrder" >> beam.MapTuple(_in_draw_order)
        return {"sets": sets, ERRORS: split[ERRORS]}


class _KnownChoiceFn(beam.DoFn):
    """A pool whose choice is in the cache becomes its chosen rows (only those are loaded);
    the choice itself goes to the ``choices`` output. Other pools pass whole."""

    def __init__(self, cache_root: str, suite: SuiteSpec, k: int) -> None:
        self._root, self._suite, self._k = cache_root, suite, k
        self._hits = Metrics.counter(METRICS_NAMESPACE, "reference_choices_from_cache")

    def setup(self) -> None:
        self._cache = SelectionCache(self._root)

    def process(self, element) -> Iterable:
        key, rows = element
        chosen = self._cache.get(pool_key(self._suite, self._k, rows))
        if chosen is None or set(chosen) != set(self._suite.extractors):
            yield key, rows
            return
        self._hits.inc()
        wanted = {i for ids in chosen.values() for i in ids}
        yield key, tuple(r for r in rows if r.image_id in wanted)
        yield beam.pvalue.TaggedOutput("choices", (key, chosen))


def pool_key(suite: SuiteSpec, k: int, rows) -> str:
    """The cache key of one pool's choice (``selection_key``)."""
    return selection_key("k-medoids", k, {e: suite.extractor_identity(e)
                                          for e in suite.extractors},
                         [(r.image_id, r.image_uri) for r in rows])


def distinct_references(sets) -> "beam.PCollection":
    """Each drawn reference once, however many seeds drew it: PCollection[ManifestRow]."""
    return (
        sets
        | "ReferenceRows" >> beam.FlatMap(lambda kv: [(r.image_id, r) for r in kv[1]])
        | "OncePerImage" >> beam.CombinePerKey(lambda rows: next(iter(rows)))
        | "DropIds" >> beam.Values()
    )


class _StackFn(beam.DoFn):
    """Stacks a group's drawn references; with ``choose`` ((suite, k, cache root or None)),
    keeps each extractor's k representative ones (a known choice from the ``choices`` side
    input, else k-medoids on the pool, stored in the cache when there is one)."""

    def __init__(self, choose: tuple[SuiteSpec, int, str | None] | None = None) -> None:
        self._choose = choose
        self._sets = Metrics.counter(METRICS_NAMESPACE, "reference_sets_built")
        self._chosen = Metrics.counter(METRICS_NAMESPACE, "reference_choices_computed")

    def setup(self) -> None:
        root = self._choose[2] if self._choose else None
        self._cache = SelectionCache(root) if root else None

    def _representative(self, key, members: list, known: dict) -> ReferencePayload:
        suite, k, _ = self._choose
        # One order for a pool whatever the seed that drew it: ties in k-medoids go to the
        # lower position, so a draw-ordered pool would let the seed decide between equals.
        members = sorted(members, key=lambda m: (m[1], m[4]))
        pool = TensorBundle.cat([m[2] for m in members])
        ids = [m[1] for m in members]
        uri = {m[1]: m[4] for m in members}
        choice = known.get(key)
        if choice is None or set(choice) != set(suite.extractors):
            choice = {ext: [ids[i] for i in choose_representative(ext, pool.part(ext), k)]
                      for ext in suite.extractors}
            self._chosen.inc()
            if self._cache is not None and len(members) == members[0][3]:  # all loaded
                self._cache.put(pool_key(suite, k, [_IdUri(i, uri[i]) for i in ids]), choice)
        tensors = {}
        for ext in suite.extractors:
            rows = [ids.index(i) for i in choice[ext] if i in uri]
            index = torch.tensor(rows, dtype=torch.long)
            tensors.update({f"{ext}/{name}": value.index_select(0, index)
                            for name, value in pool.part(ext).items()})
        chosen = {ext: tuple((i, uri[i]) for i in choice[ext] if i in uri)
                  for ext in suite.extractors}
        first = suite.extractors[0]
        return ReferencePayload(image_ids=tuple(i for i, _ in chosen[first]),
                                features=TensorBundle(tensors), selected=members[0][3],
                                image_uris=tuple(u for _, u in chosen[first]), chosen=chosen)

    def process(self, element, known: dict | None = None) -> Iterable:
        key, members = element
        members = sorted(members, key=lambda m: m[0])  # draw order
        selected = members[0][3] if members else 0
        self._sets.inc()
        if self._choose is not None:
            yield key, self._representative(key, members, known or {})
            return
        yield key, ReferencePayload(
            image_ids=tuple(m[1] for m in members),
            features=TensorBundle.cat([m[2] for m in members]),
            selected=selected,
            image_uris=tuple(m[4] for m in members),
        )


@dataclass(frozen=True)
class _IdUri:
    image_id: str
    image_uri: str


class AssembleReferenceSets(beam.PTransform):
    """Joins drawn sets with extracted features: ((dataset, category, seed), ReferencePayload).

    Input: ``{'sets': ..., 'features': (ManifestRow, TensorBundle)}``. References that failed to
    load are left out (their error rows come from LoadImages); a group left with none is absent.
    """

    def __init__(self, choose: tuple[SuiteSpec, int, str | None] | None = None,
                 choices=None) -> None:
        super().__init__()
        self._choose = choose
        self._choices = choices

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
            | "Stack" >> (beam.ParDo(_StackFn(self._choose)) if self._choices is None else
                          beam.ParDo(_StackFn(self._choose),
                                     known=beam.pvalue.AsDict(self._choices)))
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
        drawn = rows | "SelectReferences" >> SelectReferences(cfg.reference_draw, cfg.seeds)
        pools, choices, choose = drawn["sets"], None, None
        if cfg.representative:
            choose = (cfg.suite, cfg.k, cfg.feature_cache)
            if cfg.feature_cache:
                looked = pools | "KnownChoices" >> beam.ParDo(_KnownChoiceFn(
                    cfg.feature_cache, cfg.suite, cfg.k)).with_outputs("choices", main="sets")
                pools, choices = looked.sets, looked.choices
        images = (distinct_references(pools)
                  | "LoadReferenceImages" >> LoadImages(
                      cfg.suite, cfg.limits, decode_threads=cfg.decode_thread_count,
                      prefetch=cfg.batch_size))
        extracted = images["images"] | "ExtractReferenceFeatures" >> extract_suite_features(
            cfg.feature_cache, cfg.suite, cfg.batch_size, cfg.share_model_across_processes)
        features = extracted["features"] | "RowOnly" >> beam.MapTuple(_row_features)
        sets = ({"sets": pools, "features": features}
                | "AssembleReferenceSets" >> AssembleReferenceSets(choose, choices))
        errors = ((drawn[ERRORS], images[ERRORS], extracted[ERRORS])
                  | "MergeErrors" >> beam.Flatten())
        return {"sets": sets, ERRORS: errors}
