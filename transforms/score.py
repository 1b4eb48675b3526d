"""ScoreQueries: query features against their group's references, per seed, in batches.

Reference sets and prompt embeddings arrive as side inputs; each reference set is prepared
(normalised, adapted, moved to the device) once per worker and reused for every batch.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Sequence

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics

from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import ManifestRow
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.backbone import ImageFeatures, describe
from pipeline.model.inctrl import ReferenceSet, ScoreComponents
from pipeline.model.loading import TRAINING_FREE, WITH_HEADS, get_scorer
from transforms.errors import error_records, row_error
from transforms.references import ReferencePayload

STAGE_SCORE = "score"
_PREPARED_CACHE = 64


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x


def score_records(
    rows: Sequence[ManifestRow], comps: ScoreComponents, *, seed: int, payload: ReferencePayload,
    config: ScoreConfig, model_id: str, heads: str, mode: str,
) -> list[dict[str, Any]]:
    """One output record per query for one seed, with every score component."""
    cols = {name: getattr(comps, name).detach().float().cpu().tolist()
            for name in ("final", "fine", "holistic", "image_residual", "text_prior")}
    maps = comps.patch_map.detach().float().cpu().numpy() if config.write_patch_map else None
    out = []
    for i, row in enumerate(rows):
        rec = row.to_record()
        rec.update(
            seed=seed,
            k=config.k,
            k_used=len(payload.image_ids),
            reference_ids=list(payload.image_ids),
            final_score=cols["final"][i],
            fine_score=cols["fine"][i],
            holistic_score=_nan_to_none(cols["holistic"][i]),
            image_residual_score=_nan_to_none(cols["image_residual"][i]),
            text_prior_score=cols["text_prior"][i],
            scoring_mode=mode,
            model_id=model_id,
            backbone=config.backbone.name,
            pretrained=config.backbone.weights_id,
            heads_hash=heads,
            run_id=config.run_id,
        )
        rec.pop("role", None)
        if maps is not None:
            rec["patch_map"] = maps[i].tolist()
        out.append(rec)
    return out


class _ScoreFn(beam.DoFn):
    def __init__(self, config: ScoreConfig, model_id: str) -> None:
        self._config = config
        self._model_id = model_id
        self._scored = Metrics.counter(METRICS_NAMESPACE, "queries_scored")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "queries_failed")
        self._prepared_sets = Metrics.counter(METRICS_NAMESPACE, "reference_sets_prepared")

    def setup(self) -> None:
        spec = self._config.backbone
        self._device = describe(spec).device
        self._scorer, self._heads = get_scorer(spec, self._config.checkpoint)
        self._mode = WITH_HEADS if self._scorer.has_heads else TRAINING_FREE
        self._prepared: OrderedDict[tuple, ReferenceSet] = OrderedDict()
        self._texts: dict[str, torch.Tensor] = {}  # category → text features on the device

    def _references(self, key: tuple, payload: ReferencePayload) -> ReferenceSet:
        refs = self._prepared.get(key)
        if refs is None:
            with torch.no_grad():
                refs = self._scorer.prepare_references(payload.features.to(self._device))
            self._prepared[key] = refs
            self._prepared_sets.inc()
            while len(self._prepared) > _PREPARED_CACHE:
                self._prepared.popitem(last=False)
        else:
            self._prepared.move_to_end(key)
        return refs

    def process(self, batch: list, ref_sets: dict, prompts: dict) -> Iterable:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        for (row, _digest), feats in batch:
            groups[(row.dataset, row.category)].append((row, feats))
        cfg = self._config
        for (dataset, category), items in groups.items():
            rows = [r for r, _ in items]
            # Each image straight to the device, then one concatenation there: no extra host copy.
            feats = ImageFeatures.cat([f.to(self._device) for _, f in items])
            text = self._texts.get(category)
            if text is None:
                text = self._texts[category] = prompts[category].to(self._device)
            for seed in cfg.seeds:
                payload = ref_sets.get((dataset, category, seed))
                if payload is None:
                    self._failed.inc(len(rows))
                    for row in rows:
                        err = row_error(row, STAGE_SCORE, (
                            f"no usable normal reference image for dataset {dataset!r}, category "
                            f"{category!r}: none in the manifest, or none could be loaded "
                            "(see the reference rows of the errors table)"))
                        for rec in error_records(err, cfg.seeds, cfg.run_id, self._model_id, seed):
                            yield beam.pvalue.TaggedOutput(ERRORS, rec)
                    continue
                refs = self._references((dataset, category, seed), payload)
                with torch.no_grad():
                    comps = self._scorer(feats, refs, text)
                self._scored.inc(len(rows))
                yield from score_records(rows, comps, seed=seed, payload=payload, config=cfg,
                                         model_id=self._model_id, heads=self._heads,
                                         mode=self._mode)


class ScoreQueries(beam.PTransform):
    """((row, sha256), ImageFeatures) → score records (main) and error records ('errors').

    Side inputs: ``ref_sets`` ((dataset, category, seed) → ReferencePayload) and ``prompts``
    (category → text features).
    """

    def __init__(self, config: ScoreConfig, model_id: str, ref_sets, prompts) -> None:
        super().__init__()
        self._config = config
        self._model_id = model_id
        self._ref_sets = ref_sets
        self._prompts = prompts

    def expand(self, query_features):
        out = (
            query_features
            | "Batch" >> beam.BatchElements(min_batch_size=self._config.batch_size,
                                            max_batch_size=self._config.batch_size)
            | "Score" >> beam.ParDo(
                _ScoreFn(self._config, self._model_id),
                ref_sets=beam.pvalue.AsDict(self._ref_sets),
                prompts=beam.pvalue.AsDict(self._prompts),
            ).with_outputs(ERRORS, main="scores")
        )
        return {"scores": out.scores, ERRORS: out[ERRORS]}
