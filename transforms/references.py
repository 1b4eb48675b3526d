"""PrepareReferences: each group's few-shot normal references, drawn or chosen, loaded and
extracted into the feature cache.

Its steps: SelectReferences (the draw per group and seed: k candidates, or with
``representative`` selection the pool), LoadImages and feature extraction once per drawn
image into the feature cache (the user's ``--feature-cache``, else a cache private to the
run), AssembleReferenceSets (per group and seed the references' ids and content hashes; with
``representative``, each extractor's k chosen from the pool by k-medoids in its own
descriptor space, ``pipeline.model.scorers.references``, reading the pool's features from
the cache one group at a time).

No reference features travel in a PCollection: a group's set is a few ids and hashes, small
enough for a side input at any number of groups, and the scoring worker reads the features
of the groups it scores from the cache (``transforms.score``). A worker's memory therefore
does not grow with the number of product lines.

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
from pipeline.core.feature_cache import FeatureCache, SelectionCache, read_stacked, selection_key
from pipeline.core.manifest import ManifestRow
from pipeline.core.sampling import sampler_rank
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.references import choose_representative
from pipeline.model.scorers.suite import SuiteSpec
from transforms.cache import CachedSuiteFeatures, cache_identities
from transforms.errors import row_error
from transforms.images import LoadImages

STAGE_SELECT = "select_references"

GroupKey = tuple[str, str, int]  # (dataset, category, seed)


@dataclass
class ReferencePayload:
    """A group's loaded references: ids in draw order and their content hashes, the keys of
    their features in the feature cache (no tensors: it is a side input of every worker)."""

    image_ids: tuple[str, ...]
    selected: int  # how many the sampler drew (some may have failed to load)
    image_uris: tuple[str, ...] = ()  # in the order of image_ids
    # representative selection: each extractor's own k (ids and URIs), its features' order
    chosen: dict[str, tuple[tuple[str, str], ...]] | None = None
    # image_id → sha256 of the file (the feature cache's key) of every image named above
    content: dict[str, str] | None = None

    def ids_for(self, extractor: str) -> tuple[str, ...]:
        if self.chosen is not None and extractor in self.chosen:
            return tuple(i for i, _ in self.chosen[extractor])
        return self.image_ids

    def uris_for(self, extractor: str) -> tuple[str, ...]:
        if self.chosen is not None and extractor in self.chosen:
            return tuple(u for _, u in self.chosen[extractor])
        return self.image_uris

    def hashes_for(self, extractor: str) -> tuple[str, ...]:
        """The cache keys of ``extractor``'s references, in the order its features stack."""
        content = self.content or {}
        return tuple(content[i] for i in self.ids_for(extractor))


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
    """A group's drawn references as a ReferencePayload (ids, URIs, content hashes); with
    ``choose`` ((suite, k, cache root or None)), keeps each extractor's k representative
    ones (a known choice from the ``choices`` side input, else k-medoids on the pool's
    features read from ``features_root``, stored in the selection cache when there is one).
    """

    def __init__(self, choose: tuple[SuiteSpec, int, str | None] | None = None,
                 features_root: str | None = None) -> None:
        self._choose = choose
        self._features_root = features_root
        self._sets = Metrics.counter(METRICS_NAMESPACE, "reference_sets_built")
        self._chosen = Metrics.counter(METRICS_NAMESPACE, "reference_choices_computed")

    def setup(self) -> None:
        root = self._choose[2] if self._choose else None
        self._cache = SelectionCache(root) if root else None
        self._features = None
        if self._choose is not None:
            self._features = {ext: FeatureCache(self._features_root, identity) for ext, identity
                              in cache_identities(self._choose[0], references=True).items()}

    def _pool(self, members: list, ext: str) -> dict[str, torch.Tensor]:
        return read_stacked(self._features[ext], [m[2] for m in members])

    def _representative(self, key, members: list, known: dict) -> ReferencePayload:
        suite, k, _ = self._choose
        # One order for a pool whatever the seed that drew it: ties in k-medoids go to the
        # lower position, so a draw-ordered pool would let the seed decide between equals.
        members = sorted(members, key=lambda m: (m[1], m[4]))
        ids = [m[1] for m in members]
        uri = {m[1]: m[4] for m in members}
        choice = known.get(key)
        if choice is None or set(choice) != set(suite.extractors):
            choice = {ext: [ids[i] for i in choose_representative(ext, self._pool(members, ext),
                                                                   k)]
                      for ext in suite.extractors}
            self._chosen.inc()
            if self._cache is not None and len(members) == members[0][3]:  # all loaded
                self._cache.put(pool_key(suite, k, [_IdUri(i, uri[i]) for i in ids]), choice)
        chosen = {ext: tuple((i, uri[i]) for i in choice[ext] if i in uri)
                  for ext in suite.extractors}
        first = suite.extractors[0]
        return ReferencePayload(image_ids=tuple(i for i, _ in chosen[first]),
                                selected=members[0][3],
                                image_uris=tuple(u for _, u in chosen[first]), chosen=chosen,
                                content={m[1]: m[2] for m in members if m[1] in
                                         {i for c in chosen.values() for i, _ in c}})

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
            selected=selected,
            image_uris=tuple(m[4] for m in members),
            content={m[1]: m[2] for m in members},
        )


@dataclass(frozen=True)
class _IdUri:
    image_id: str
    image_uri: str


class AssembleReferenceSets(beam.PTransform):
    """Joins drawn sets with the references whose features are in the cache:
    ((dataset, category, seed), ReferencePayload).

    Input: ``{'sets': ..., 'hashes': (ManifestRow, sha256)}``. References that failed to
    load or extract are left out (their error rows come from LoadImages and the extraction);
    a group left with none is absent. With ``choose`` the pools' features are read from
    ``features_root`` (the cache the extraction wrote).
    """

    def __init__(self, choose: tuple[SuiteSpec, int, str | None] | None = None,
                 choices=None, features_root: str | None = None) -> None:
        super().__init__()
        if choose is not None and features_root is None:
            raise ValueError("representative selection reads the pools' features: give the "
                             "feature cache they were extracted into (features_root)")
        self._fn = _StackFn(choose, features_root)
        self._choices = choices

    def expand(self, inputs):
        members = inputs["sets"] | "Memberships" >> beam.FlatMap(lambda kv: [
            (row.image_id, (kv[0], position, len(kv[1]), row.image_uri))
            for position, row in enumerate(kv[1])])
        hashes = inputs["hashes"] | "HashesById" >> beam.MapTuple(
            lambda row, sha256: (row.image_id, sha256))
        return (
            {"members": members, "hashes": hashes}
            | "JoinById" >> beam.CoGroupByKey()
            | "ToGroups" >> beam.FlatMap(_to_groups)
            | "GroupSets" >> beam.GroupByKey()
            | "Stack" >> (beam.ParDo(self._fn) if self._choices is None else
                          beam.ParDo(self._fn, known=beam.pvalue.AsDict(self._choices)))
        )


def _to_groups(element) -> Iterable:
    image_id, joined = element
    hashes = list(joined["hashes"])
    if not hashes:
        return
    for key, position, selected, uri in joined["members"]:
        yield key, (position, image_id, hashes[0], selected, uri)


class PrepareReferences(beam.PTransform):
    """Manifest rows → each group's few-shot references, drawn, loaded and extracted once.

    Returns ``{'sets': ((dataset, category, seed), ReferencePayload), 'errors': RowError}``:
    draw k normal references per group and seed (rows for which ``candidate(row)`` is true),
    load each drawn image once however many seeds drew it, extract the features of every
    extractor the run's scorers read into the feature cache at ``cache_root`` (images
    already there are not run again) and name them per group by content hash.
    With k = 0 (zero-shot) nothing is drawn: both outputs are empty.
    """

    def __init__(self, config: ScoreConfig, cache_root: str, candidate=None) -> None:
        super().__init__()
        self._config = config
        self._cache_root = cache_root
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
        extracted = images["images"] | "ExtractReferenceFeatures" >> CachedSuiteFeatures(
            self._cache_root, cfg.suite, cfg.batch_size, cfg.share_model_across_processes,
            references=True)
        # (row, sha256) of each image whose features are in the cache: no tensor leaves
        # the extraction's stage.
        sets = ({"sets": pools, "hashes": extracted["stored"]}
                | "AssembleReferenceSets" >> AssembleReferenceSets(
                    choose, choices, features_root=self._cache_root))
        errors = ((drawn[ERRORS], images[ERRORS], extracted[ERRORS])
                  | "MergeErrors" >> beam.Flatten())
        return {"sets": sets, ERRORS: errors}
