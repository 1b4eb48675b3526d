"""ScoreQueries: query features against their group's references, per seed and scorer.

Reference sets and prompt embeddings arrive as side inputs; each scorer builds a group's
normal memory once per (dataset, category, seed) on a worker and reuses it for every batch.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Sequence

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics

from pipeline.core import console
from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import ManifestRow
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.base import CATEGORY, TEXT, ScorerOutput
from pipeline.model.scorers.suite import IMAGE_SIZE, RunIdentity, TensorBundle, build_scorers
from transforms.errors import error_records, row_error
from transforms.maps import GRID_KEY, PATCH_MAP_KEY, SIZE_KEY
from transforms.references import ReferencePayload

STAGE_SCORE = "score"
_PREPARED_CACHE = 64  # (group, seed) memories per scorer kept on a worker
_NO_REFERENCES = ReferencePayload(image_ids=(), features=TensorBundle(), selected=0)


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


class _ScoreFn(beam.DoFn):
    def __init__(self, config: ScoreConfig, identity: RunIdentity) -> None:
        self._config = config
        self._identity = identity
        self._scored = Metrics.counter(METRICS_NAMESPACE, "queries_scored")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "queries_failed")
        self._prepared_sets = Metrics.counter(METRICS_NAMESPACE, "reference_sets_prepared")

    def setup(self) -> None:
        suite = self._config.suite
        self._device = torch.device(suite.device)
        self._scorers = build_scorers(suite)
        self._extractor = {name: suite.entry(name).extractor for name in self._scorers}
        self._prepared: OrderedDict[tuple, Any] = OrderedDict()
        self._texts: dict[str, torch.Tensor] = {}  # category → text features on the device

    def _memory(self, key: tuple, scorer: str, payload: ReferencePayload,
                text: torch.Tensor | None) -> Any:
        """The scorer's memory of one (dataset, category, seed), built once per worker."""
        key = (*key, scorer)
        memory = self._prepared.get(key)
        if memory is None:
            refs = payload.features.to(self._device).part(self._extractor[scorer])
            context = {CATEGORY: key[1]}
            if text is not None:
                context[TEXT] = text
            with torch.no_grad():
                memory = self._scorers[scorer].build_memory(refs, context)
            self._prepared[key] = memory
            self._prepared_sets.inc()
            while len(self._prepared) > _PREPARED_CACHE * len(self._scorers):
                self._prepared.popitem(last=False)
        else:
            self._prepared.move_to_end(key)
        return memory

    def _no_references(self, rows: list, dataset: str, category: str, seed: int) -> Iterable:
        cfg = self._config
        self._failed.inc(len(rows) * len(self._scorers))
        for row in rows:
            err = row_error(row, STAGE_SCORE, (
                f"no usable normal reference image for dataset {dataset!r}, category "
                f"{category!r}: none in the manifest, or none could be loaded "
                "(see the reference rows of the errors table)"))
            model_ids = {name: self._identity.model_id(name) for name in self._scorers}
            for rec in error_records(err, cfg.seeds, model_ids, cfg.run_id, seed):
                yield beam.pvalue.TaggedOutput(ERRORS, rec)

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
                for name, scorer in self._scorers.items():
                    memory = self._memory((dataset, category, seed), name, payload, text)
                    with torch.no_grad():
                        out = scorer.score(feats.part(self._extractor[name]), memory)
                    self._scored.inc(len(queries))
                    yield from score_records(
                        rows, out, scorer=name, seed=seed, payload=payload, config=cfg,
                        identity=self._identity, sizes=sizes)
            console.advance(len(queries))  # a local run's progress line, if it has one


class ScoreQueries(beam.PTransform):
    """((row, sha256), TensorBundle) → score records (main) and error records ('errors'):
    one per query, seed and scorer.

    Side inputs: ``ref_sets`` ((dataset, category, seed) → ReferencePayload) and ``prompts``
    (category → text features; empty when no scorer reads text). ``identity``: what
    produced each scorer's rows.
    """

    def __init__(self, config: ScoreConfig, identity: RunIdentity, ref_sets, prompts) -> None:
        super().__init__()
        self._config = config
        self._identity = identity
        self._ref_sets = ref_sets
        self._prompts = prompts

    def expand(self, query_features):
        out = (
            query_features
            | "Batch" >> beam.BatchElements(min_batch_size=self._config.batch_size,
                                            max_batch_size=self._config.batch_size)
            | "Score" >> beam.ParDo(
                _ScoreFn(self._config, self._identity),
                ref_sets=beam.pvalue.AsDict(self._ref_sets),
                prompts=beam.pvalue.AsDict(self._prompts),
            ).with_outputs(ERRORS, main="scores")
        )
        return {"scores": out.scores, ERRORS: out[ERRORS]}
