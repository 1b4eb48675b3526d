"""ScoreQueries: query features against their group's references, per seed and scorer.

Reference sets (ids and content hashes, no tensors) and prompt embeddings arrive as side
inputs. The first batch of a (dataset, category, seed) on a worker reads that group's
reference features from the feature cache the reference extraction wrote, and every scorer
builds its normal memory from them; the memories stay in a bounded LRU of groups and are
reused for every later batch. What a worker holds is bounded by that LRU, not by the number
of groups in the run.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Sequence

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics

from pipeline.core import console
from pipeline.core.config import ScoreConfig
from pipeline.core.feature_cache import FeatureCache, read_stacked
from pipeline.core.manifest import ManifestRow
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.base import CATEGORY, TEXT, ScorerOutput
from pipeline.model.scorers.suite import IMAGE_SIZE, RunIdentity, TensorBundle, build_scorers
from transforms.cache import cache_identities
from transforms.errors import error_records, row_error
from transforms.maps import GRID_KEY, PATCH_MAP_KEY, SIZE_KEY
from transforms.references import ReferencePayload

LOG = logging.getLogger(__name__)

STAGE_SCORE = "score"
_PREPARED_CACHE = 64  # (group, seed) memories of every scorer kept on a worker
_NO_REFERENCES = ReferencePayload(image_ids=(), selected=0)


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x


def score_records(
    rows: Sequence[ManifestRow], out: ScorerOutput, *, scorer: str, seed: int,
    payload: ReferencePayload, config: ScoreConfig, identity: RunIdentity,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """One output record per query for one seed and scorer. A scorer's declared components
    (``ScorerEntry.components``) fill their ``<name>_score`` columns; the other component
    columns stay null. With ``config.anomaly_maps`` the records also carry, under internal
    keys, the patch map, its grid and the image's size (``sizes``), for AnomalyMaps."""
    suite = config.suite
    entry = suite.entry(scorer)
    final = out.score.detach().float().cpu().tolist()
    cols = {name: out.components[name].detach().float().cpu().tolist()
            for name in entry.components if name in out.components}
    maps = None
    if (config.write_patch_map or config.anomaly_maps) and out.patch_map is not None:
        maps = out.patch_map.detach().float().cpu()
    backbone, pretrained = suite.backbone_of(scorer)
    ids = payload.ids_for(entry.extractor)
    mode = entry.mode(suite, config.k)
    model_id, heads = identity.model_id(scorer), identity.checkpoint_label(scorer)
    records = []
    for i, row in enumerate(rows):
        rec = row.to_record()
        rec.update(
            seed=seed,
            scorer=scorer,
            k=config.k,
            k_used=len(ids),
            reference_ids=list(ids),
            reference_uris=list(payload.uris_for(entry.extractor)),
            reference_selection=config.reference_selection,
            final_score=final[i],
            scoring_mode=mode,
            model_id=model_id,
            backbone=backbone,
            pretrained=pretrained,
            heads_hash=heads,
            run_id=config.run_id,
        )
        for name, values in cols.items():
            rec[f"{name}_score"] = _nan_to_none(values[i])
        rec.pop("role", None)
        if maps is not None and config.write_patch_map:
            rec["patch_map"] = maps[i].reshape(-1).tolist()
            rec["patch_map_height"], rec["patch_map_width"] = maps.shape[1], maps.shape[2]
        if maps is not None and config.anomaly_maps and sizes is not None:
            rec[PATCH_MAP_KEY] = maps[i].numpy()
            rec[GRID_KEY] = (maps.shape[1], maps.shape[2])
            rec[SIZE_KEY] = sizes[i]
        records.append(rec)
    return records


def failure_reason(exc: BaseException, during: str) -> str:
    """An error row's reason for an exception: its type and message, and what was running."""
    return f"{type(exc).__name__}: {exc} (while {during})"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _ScoreFn(beam.DoFn):
    """Scores batches of one or more groups' queries, every seed and scorer. A failure is
    confined to the rows it touches: an exception while building a group's memory fails that
    (group, seed, scorer)'s rows of every batch, one while scoring a batch that batch's rows
    of the (seed, scorer), a non-finite score its own row; each becomes an error row of stage
    ``score`` and the rest is scored."""

    def __init__(self, config: ScoreConfig, identity: RunIdentity, cache_root: str) -> None:
        self._config = config
        self._identity = identity
        self._cache_root = cache_root
        self._scored = Metrics.counter(METRICS_NAMESPACE, "queries_scored")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "queries_failed")
        self._prepared_sets = Metrics.counter(METRICS_NAMESPACE, "reference_sets_prepared")
        self._memory_failures = Metrics.counter(METRICS_NAMESPACE, "reference_memories_failed")
        self._batch_failures = Metrics.counter(METRICS_NAMESPACE, "score_batches_failed")
        self._nonfinite = Metrics.counter(METRICS_NAMESPACE, "nonfinite_scores")
        self._held = Metrics.distribution(METRICS_NAMESPACE, "reference_sets_held")

    def setup(self) -> None:
        suite = self._config.suite
        self._device = torch.device(suite.device)
        self._scorers = build_scorers(suite)
        self._extractor = {name: suite.entry(name).extractor for name in self._scorers}
        self._model_ids = {name: self._identity.model_id(name) for name in self._scorers}
        self._caches = {ext: FeatureCache(self._cache_root, identity) for ext, identity
                        in cache_identities(suite, references=True).items()}
        # (dataset, category, seed) → {scorer: memory, or the exception that building it raised}
        self._prepared: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._texts: dict[str, torch.Tensor] = {}  # category → text features on the device

    def _references(self, payload: ReferencePayload) -> TensorBundle:
        """A group's reference features, every extractor's (batch k), on the device."""
        parts = {ext: read_stacked(cache, payload.hashes_for(ext))
                 for ext, cache in self._caches.items()}
        return TensorBundle.join(parts).to(self._device)

    def _memories(self, key: tuple, payload: ReferencePayload,
                  text: torch.Tensor | None) -> dict[str, Any]:
        """Every scorer's memory of one (dataset, category, seed), built once per worker and
        kept in a bounded LRU; a scorer whose memory could not be built has the exception
        instead (kept too: the group is not retried for each of its batches)."""
        memories = self._prepared.get(key)
        if memories is not None:
            self._prepared.move_to_end(key)
            return memories
        memories = {}
        try:
            refs = self._references(payload)
        except Exception as exc:  # noqa: BLE001 - the group's rows become error rows
            LOG.warning("The reference features of %s could not be read: %s", key,
                        failure_reason(exc, "reading the references' features"))
            self._memory_failures.inc(len(self._scorers))
            refs = exc.with_traceback(None)  # kept: its frames would pin their tensors
        context = {CATEGORY: key[1]}
        if text is not None:
            context[TEXT] = text
        for name, scorer in self._scorers.items():
            self._prepared_sets.inc()  # one per scorer memory built
            if isinstance(refs, Exception):
                memories[name] = refs
                continue
            try:
                with torch.no_grad():
                    memories[name] = scorer.build_memory(refs.part(self._extractor[name]),
                                                         context)
            except Exception as exc:  # noqa: BLE001 - the group's rows become error rows
                LOG.warning("Scorer %s could not build the memory of %s: %s", name, key,
                            failure_reason(exc, "preparing the references' memory"))
                memories[name] = exc.with_traceback(None)  # kept: frames pin tensors
                self._memory_failures.inc()
        self._prepared[key] = memories
        while len(self._prepared) > _PREPARED_CACHE:
            self._prepared.popitem(last=False)
        self._held.update(len(self._prepared))
        return memories

    def _error_rows(self, rows: Sequence[ManifestRow], seed: int, scorer: str | None,
                    reason: str) -> Iterable:
        """Error records of ``rows`` for one seed and one scorer (None: every scorer)."""
        self._failed.inc(len(rows) * (1 if scorer is not None else len(self._scorers)))
        for row in rows:
            for rec in error_records(row_error(row, STAGE_SCORE, reason), self._config.seeds,
                                     self._model_ids, self._config.run_id, seed, scorer):
                yield beam.pvalue.TaggedOutput(ERRORS, rec)

    def _no_references(self, rows: list, dataset: str, category: str, seed: int) -> Iterable:
        yield from self._error_rows(rows, seed, None, (
            f"no usable normal reference image for dataset {dataset!r}, category "
            f"{category!r}: none in the manifest, or none could be loaded "
            "(see the reference rows of the errors table)"))

    def _score_one(self, name: str, rows: list, feats: TensorBundle, memory: Any, *,
                   seed: int, payload: ReferencePayload, sizes) -> Iterable:
        """One scorer's records of one batch and seed; failures as error rows (for queries:
        a calibration image that cannot be scored only leaves the calibration set)."""
        queries = [r for r in rows if r.role == "query"]
        if isinstance(memory, Exception):
            yield from self._error_rows(queries, seed, name, failure_reason(
                memory, "preparing the references' memory"))
            return
        try:
            with torch.no_grad():
                out = self._scorers[name].score(feats.part(self._extractor[name]), memory)
            records = score_records(rows, out, scorer=name, seed=seed, payload=payload,
                                    config=self._config, identity=self._identity, sizes=sizes)
        except Exception as exc:  # noqa: BLE001 - the batch's rows become error rows
            self._batch_failures.inc()
            LOG.warning("Scorer %s failed on a batch of %d queries: %s", name, len(rows),
                        failure_reason(exc, "scoring a batch"))
            yield from self._error_rows(queries, seed, name,
                                        failure_reason(exc, "scoring a batch"))
            return
        for row, rec in zip(rows, records):
            query = row.role == "query"
            if _finite(rec["final_score"]):
                if query:
                    self._scored.inc()
                yield rec
                continue
            self._nonfinite.inc()
            if query:
                yield from self._error_rows([row], seed, name,
                                            f"non-finite score {rec['final_score']!r}")

    def process(self, batch: list, ref_sets: dict, prompts: dict) -> Iterable:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for (row, _digest), feats in batch:
            groups[(row.dataset, row.category)].append((row, feats))
        cfg = self._config
        for (dataset, category), items in groups.items():
            rows = [r for r, _ in items]
            # Each image straight to the device, then one concatenation there: no extra host copy.
            feats = TensorBundle.cat([f.to(self._device) for _, f in items])
            sizes = ([tuple(int(v) for v in hw) for hw in feats[IMAGE_SIZE].tolist()]
                     if cfg.anomaly_maps and IMAGE_SIZE in feats.tensors else None)
            text = self._texts.get(category)
            if text is None and category in prompts:  # only when a scorer reads text
                text = self._texts[category] = prompts[category].to(self._device)
            queries = [r for r in rows if r.role == "query"]  # not the calibration images
            for seed in cfg.seeds:
                payload = _NO_REFERENCES if cfg.k == 0 else ref_sets.get(
                    (dataset, category, seed))
                if payload is None:
                    yield from self._no_references(queries, dataset, category, seed)
                    continue
                memories = self._memories((dataset, category, seed), payload, text)
                for name in self._scorers:
                    yield from self._score_one(name, rows, feats, memories[name], seed=seed,
                                               payload=payload, sizes=sizes)
            console.advance(len(queries))  # a local run's progress line, if it has one


class ScoreQueries(beam.PTransform):
    """((row, sha256), TensorBundle) → score records (main) and error records ('errors'):
    one per query, seed and scorer.

    Side inputs: ``ref_sets`` ((dataset, category, seed) → ReferencePayload: ids and content
    hashes) and ``prompts`` (category → (2, embed_dim) text features; empty when no scorer
    reads text). The references' features are read from the feature cache at
    ``cache_root`` (PrepareReferences wrote them there). ``identity``: what produced each
    scorer's rows.
    """

    def __init__(self, config: ScoreConfig, identity: RunIdentity, ref_sets, prompts,
                 cache_root: str) -> None:
        super().__init__()
        self._config = config
        self._identity = identity
        self._ref_sets = ref_sets
        self._prompts = prompts
        self._cache_root = cache_root

    def expand(self, query_features):
        out = (
            query_features
            | "Batch" >> beam.BatchElements(min_batch_size=self._config.batch_size,
                                            max_batch_size=self._config.batch_size)
            | "Score" >> beam.ParDo(
                _ScoreFn(self._config, self._identity, self._cache_root),
                ref_sets=beam.pvalue.AsDict(self._ref_sets),
                prompts=beam.pvalue.AsDict(self._prompts),
            ).with_outputs(ERRORS, main="scores")
        )
        return {"scores": out.scores, ERRORS: out[ERRORS]}
