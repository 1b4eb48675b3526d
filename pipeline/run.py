"""The scoring job: read manifest → prepare references → load images → extract features →
score queries → write outputs."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.runners.runner import PipelineResult

from pipeline.core.commit import CommitPlan, date_lease
from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import validate_manifest_schema
from pipeline.core.schemas import ERRORS
from pipeline.core.selection import ALL_ROWS, RowSelection
from pipeline.model.loading import heads_hash, model_id
from pipeline.runner import counter, run_pipeline
from transforms.features import ExtractSuiteFeatures
from transforms.images import LoadImages
from transforms.manifest import ReadManifest, SelectQueries
from transforms.outputs import WriteOutputs
from transforms.prompts import EncodePrompts
from transforms.references import PrepareReferences
from transforms.score import ScoreQueries

LOG = logging.getLogger(__name__)


def build_pipeline(p: beam.Pipeline, config: ScoreConfig, *, model: str,
                   manifest_schema: pa.Schema | None,
                   selection: RowSelection = ALL_ROWS, plan: CommitPlan | None = None,
                   commit: bool = True) -> dict:
    """Wire the scoring job into ``p``; ``model`` is the run's model id (computed once).

    ``selection`` says which queries are scored, which references may be drawn and which
    earlier score rows are kept (the nightly job narrows them; ``score`` takes all).
    ``plan`` and ``commit`` go to WriteOutputs (how the run commits, or only stages).
    Returns WriteOutputs' ``{'scores', 'errors', 'committed'}``.
    """
    manifest = p | "ReadManifest" >> ReadManifest(config.manifest)
    queries = manifest["rows"] | "SelectQueries" >> SelectQueries(selection.is_query)
    references = manifest["rows"] | "PrepareReferences" >> PrepareReferences(
        config, selection.is_candidate)
    prompts = queries | "EncodePrompts" >> EncodePrompts(
        config.backbone, config.semantic_classes, config.feature_cache,
        text_on_cpu=config.share_model_across_processes)
    # Queries reach the fused decode → backbone → scoring stage in per-group chunks of a few
    # batches, so each batch is scored against one group's prepared references.
    # One decode per image, one forward per extractor the scorers read (suite.extractors).
    images = queries | "LoadQueryImages" >> LoadImages(
        config.suite, config.limits, decode_threads=config.decode_thread_count,
        prefetch=config.batch_size, group_chunk=config.query_chunk)
    features = images["images"] | "ExtractQueryFeatures" >> ExtractSuiteFeatures(
        config.suite, config.batch_size, config.share_model_across_processes,
        on_device=config.features_on_device)
    scored = features | "ScoreQueries" >> ScoreQueries(
        config, model, references["sets"], prompts)
    return (
        {"scores": scored["scores"], "score_errors": scored[ERRORS], "queries": queries,
         "manifest_errors": manifest[ERRORS], "reference_errors": references[ERRORS],
         "image_errors": images[ERRORS]}
        | "WriteOutputs" >> WriteOutputs(config, model_id=model, manifest_schema=manifest_schema,
                                         carried_scores=selection.carried_scores, plan=plan,
                                         commit=commit)
    )


def run_score(config: ScoreConfig, beam_args: Sequence[str] = (), *,
              manifest_schema: pa.Schema | None = None, model: str | None = None,
              selection: RowSelection = ALL_ROWS, plan: CommitPlan | None = None,
              commit: bool = True, lock_wait_s: float = 0.0) -> PipelineResult:
    """Check the inputs, then build and run the scoring job; blocks until it finishes.

    The manifest schema and the model id are computed here unless the caller has them.
    The run holds the lock of its date (``pipeline.core.commit.date_lease``: waiting up to
    ``lock_wait_s`` for another run of the date, else refusing with ``LockHeld``) unless the
    caller holds it and passes its ``plan``; with ``commit=False`` the outputs are staged
    for the caller to commit.
    """
    if manifest_schema is None:
        manifest_schema = validate_manifest_schema(config.manifest)
    if model is None:
        # Hashing the checkpoint here makes a missing one fail now, not on a worker.
        model = model_id(config.backbone, heads_hash(config.checkpoint))
    LOG.info("Scoring %s → %s (scorers %s, k=%d, seeds=%s, model=%s, run %s, date %s)",
             config.manifest, config.output, ",".join(config.scorers), config.k, config.seeds,
             model, config.run_id, config.run_date)
    lease = nullcontext(plan) if plan is not None else date_lease(
        config.output, config.run_date, config.run_id, wait_s=lock_wait_s)
    with lease as held:
        result = run_pipeline(
            lambda p: build_pipeline(p, config, model=model, manifest_schema=manifest_schema,
                                     selection=selection, plan=held, commit=commit),
            beam_args)
    if counter(result, "queries_selected") == 0:
        LOG.warning("No query rows to score in %s: the run wrote no scores (its summary says "
                    "so)", config.manifest)
    return result
