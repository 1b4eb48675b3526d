"""The scoring job: read manifest → prepare references → load images → extract features →
score queries → decide → write outputs."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from typing import Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from apache_beam.runners.runner import PipelineResult

from pipeline.core.commit import CommitPlan
from pipeline.core.lease import date_lease
from pipeline.core.config import ScoreConfig
from pipeline.core.console import start_progress, stop_progress
from pipeline.core.failures import TooManyFailures, read_refusal
from pipeline.core.manifest import manifest_files, validate_manifest_schema
from pipeline.core.schemas import ERRORS
from pipeline.core.selection import ALL_ROWS, RowSelection
from pipeline.model.scorers.suite import RunIdentity
from pipeline.runner import DIRECT_RUNNERS, counter, run_pipeline, runner_name
from transforms.decisions import DecideAnomalies, SelectCalibration, from_pool
from transforms.features import ExtractSuiteFeatures
from transforms.images import LoadImages
from transforms.manifest import ReadManifest, SelectQueries
from transforms.outputs import WriteOutputs
from transforms.prompts import EncodePrompts
from transforms.references import PrepareReferences
from transforms.score import ScoreQueries

LOG = logging.getLogger(__name__)

#: The manifest column of ground-truth masks; with it the job computes pixel metrics.
MASK_COLUMN = "mask_uri"


def build_pipeline(p: beam.Pipeline, config: ScoreConfig, *, identity: RunIdentity,
                   manifest_schema: pa.Schema | None,
                   selection: RowSelection = ALL_ROWS, plan: CommitPlan | None = None,
                   commit: bool = True) -> dict:
    """Wire the scoring job into ``p``; ``identity`` says what produces each scorer's rows
    (computed once).

    ``selection`` says which queries are scored, which references may be drawn and which
    earlier score rows are kept (the nightly job narrows them; ``score`` takes all).
    ``plan`` and ``commit`` go to WriteOutputs (how the run commits, or only stages).
    Returns WriteOutputs' ``{'scores', 'errors', 'committed'}``.
    """
    plan = plan or CommitPlan(config.output, config.run_date, config.run_id)
    # Reference features go to the feature cache, the user's or one private to the run
    # (removed when the run's lease ends), and scoring workers read them from there.
    cache = config.feature_cache or plan.feature_cache_url
    manifest = p | "ReadManifest" >> ReadManifest(config.manifest)
    queries = manifest["rows"] | "SelectQueries" >> SelectQueries(selection.is_query)
    references = manifest["rows"] | "PrepareReferences" >> PrepareReferences(
        config, cache, selection.is_candidate)
    # Normal images that calibrate the decisions travel with the queries, marked, and are
    # scored against the same references (transforms.decisions).
    calibration = manifest["rows"] | "SelectCalibration" >> SelectCalibration(
        config, selection, queries, references["sets"])
    # Prompt embeddings only for scorers that read text: a run without them loads no CLIP.
    prompts = (queries | "EncodePrompts" >> EncodePrompts(
        config.backbone, config.semantic_classes, config.feature_cache,
        text_on_cpu=config.share_model_across_processes) if config.suite.needs_text
        else p | "NoPrompts" >> beam.Create([]))
    # Queries reach the fused decode → backbone → scoring stage in per-group chunks of a few
    # batches, so each batch is scored against one group's prepared references.
    # One decode per image, one forward per extractor the scorers read (suite.extractors).
    images = ((queries, calibration["rows"]) | "WithCalibration" >> beam.Flatten()
              | "LoadQueryImages" >> LoadImages(
                  config.suite, config.limits, decode_threads=config.decode_thread_count,
                  prefetch=config.batch_size, group_chunk=config.query_chunk))
    # Each query's features a view of its batch's: ScoreQueries, fused behind, scores them
    # batch by batch and drops them.
    features = images["images"] | "ExtractQueryFeatures" >> ExtractSuiteFeatures(
        config.suite, config.batch_size, config.share_model_across_processes,
        on_device=config.features_on_device, views=True)
    scored = features["features"] | "ScoreQueries" >> ScoreQueries(
        config, identity, references["sets"], prompts, cache)
    decided = scored["scores"] | "DecideAnomalies" >> DecideAnomalies(config)
    # A reference candidate that cannot be read is PrepareReferences' to report.
    image_errors = ((images[ERRORS], features[ERRORS]) | "QueryImageErrors" >> beam.Flatten()
                    | "NotPoolErrors" >> beam.Filter(lambda e: not from_pool(e)))
    return (
        {"scores": decided, "score_errors": scored[ERRORS], "queries": queries,
         "manifest_errors": manifest[ERRORS], "reference_errors": references[ERRORS],
         "image_errors": image_errors, "calibration_errors": calibration[ERRORS],
         "manifest_rows": manifest["rows"]}
        | "WriteOutputs" >> WriteOutputs(config, model_ids=identity.by_scorer(),
                                         manifest_schema=manifest_schema,
                                         carried_scores=selection.carried_scores, plan=plan,
                                         commit=commit)
    )


def publish_report(output: str, run_date: str) -> str | None:
    """Write the date's HTML report from its committed outputs; a report that cannot be
    written is logged, never a failed run (the outputs are committed already)."""
    from pipeline.report import build_report

    try:
        path = build_report(output, run_date)
    except Exception:  # noqa: BLE001 - the report is a view of committed results
        LOG.exception("The report of %s could not be written; the run's outputs are "
                      "committed (rebuild it with python -m pipeline report)", run_date)
        return None
    LOG.info("Report: %s", path)
    return path


def _count_queries(manifest: str) -> int | None:
    """The manifest's rows whose role reads ``query`` (the progress line's total; reads one
    column), or None when it cannot be counted cheaply."""
    try:
        fs, _ = fsspec.core.url_to_fs(manifest)
        data = pads.dataset([fsspec.core.url_to_fs(f)[1] for f in manifest_files(manifest)],
                            filesystem=fs, format="parquet")
        roles = data.to_table(columns=["role"]).column("role")
        return int(pc.sum(pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(roles)),
                                   "query")).as_py() or 0)
    except Exception as exc:  # noqa: BLE001 - progress is a nicety, never a failure
        LOG.debug("Could not count the manifest's queries: %s", exc)
        return None


def run_score(config: ScoreConfig, beam_args: Sequence[str] = (), *,
              manifest_schema: pa.Schema | None = None, identity: RunIdentity | None = None,
              selection: RowSelection = ALL_ROWS, plan: CommitPlan | None = None,
              commit: bool = True, lock_wait_s: float = 0.0,
              total_queries: int | None = None) -> PipelineResult:
    """Check the inputs, then build and run the scoring job; blocks until it finishes.

    The manifest schema and the run's identity (every scorer's model id, checkpoints hashed)
    are computed here unless the caller has them.
    The run holds the lock of its date (``pipeline.core.lease.date_lease``: waiting up to
    ``lock_wait_s`` for another run of the date, else refusing with ``LockHeld``) unless the
    caller holds it and passes its ``plan``; with ``commit=False`` the outputs are staged
    for the caller to commit. When more than ``config.max_failed_fraction`` of the rows
    failed, nothing is committed (or staged) and :class:`TooManyFailures` is raised. On a local runner a progress line counts the queries scored
    against ``total_queries`` (default: the manifest's query rows).
    """
    if manifest_schema is None:
        manifest_schema = validate_manifest_schema(config.manifest)
    if MASK_COLUMN in manifest_schema.names and not config.pixel_metrics:
        config = replace(config, pixel_metrics=True)  # masks given: measure maps against them
    if identity is None:
        # Hashing the checkpoints here makes a missing one fail now, not on a worker.
        identity = config.suite.identity()
    models = "; ".join(f"{s}: {m}" for s, m in identity.model_ids)
    LOG.info("Scoring %s → %s (scorers %s, k=%d, seeds=%s, run %s, date %s; models %s)",
             config.manifest, config.output, ",".join(config.scorers), config.k, config.seeds,
             config.run_id, config.run_date, models)
    lease = nullcontext(plan) if plan is not None else date_lease(
        config.output, config.run_date, config.run_id, wait_s=lock_wait_s)
    local = runner_name(beam_args) in DIRECT_RUNNERS
    if local:
        start_progress(total_queries if total_queries is not None
                       else _count_queries(config.manifest))
    try:
        with lease as held:
            result = run_pipeline(
                lambda p: build_pipeline(p, config, identity=identity,
                                         manifest_schema=manifest_schema,
                                         selection=selection, plan=held, commit=commit),
                beam_args)
            # Read before the lease ends: leaving it collects the run's staging folder.
            refusal = read_refusal(config.output, held.staging)
            if refusal is not None:
                raise TooManyFailures(refusal[0], refusal[1], config.run_date)
    finally:
        if local:
            stop_progress()
    if commit:
        publish_report(config.output, config.run_date)
    if counter(result, "queries_selected") == 0:
        LOG.warning("No query rows to score in %s: the run wrote no scores (its summary says "
                    "so)", config.manifest)
    return result
