"""The scoring job: read manifest → pick references → load images → extract features → score → write."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Sequence

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.config import (ScoreConfig, add_score_flags, default_decode_threads,
                             score_config_from_args)
from pipeline.manifest import validate_manifest_schema
from pipeline.model.loading import heads_hash, model_id
from pipeline.schemas import ERROR_SCHEMA, ERRORS, SCORES, SUMMARY, scores_schema
from transforms.cache import extract_features
from transforms.errors import ERRORS as ERROR_TAG
from transforms.errors import error_records
from transforms.features import ExtractFeatures
from transforms.images import LoadImages
from transforms.manifest import ReadManifest
from transforms.prompts import EncodePrompts
from transforms.references import AssembleReferenceSets, SelectReferences, distinct_references
from transforms.score import ScoreQueries
from transforms.summary import SummarizeMetrics
from transforms.write import WritePartitioned

LOG = logging.getLogger(__name__)

DIRECT_RUNNERS = {"DirectRunner", "SwitchingDirectRunner", None}
DASK_RUNNERS = {"DaskRunner", "apache_beam.runners.dask.dask_runner.DaskRunner"}


def make_runner(options: PipelineOptions):
    """The runner named by the options; the DirectRunner runs in-process with no download.

    Beam's DirectRunner first tries to fetch a Prism binary from the network; for batch jobs
    it then uses the in-process FnApiRunner, which we pick directly so offline runs stay offline.
    ``DaskRunner`` is Beam's, with the translation fixes of ``pipeline.runners``.
    """
    name = options.view_as(StandardOptions).runner
    if name in DIRECT_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    if name in DASK_RUNNERS:
        from pipeline.runners import DaskRunner  # needs the [dask] extra

        return DaskRunner()
    return None  # Beam resolves it from the options


@dataclass(frozen=True)
class JobOutputs:
    scores: beam.PCollection
    errors: beam.PCollection
    committed: beam.PCollection


# Query rows per (dataset, category) chunk, in batches: big enough that batches rarely mix
# groups, small enough that one big category still spreads over many workers.
QUERY_CHUNK_BATCHES = 4


def build_pipeline(p: beam.Pipeline, config: ScoreConfig, manifest_schema: pa.Schema | None,
                   carried_scores: beam.PCollection | None = None,
                   query_filter=None, reference_filter=None) -> JobOutputs:
    """Wire the scoring job into ``p``. ``query_filter(row) -> bool`` narrows the queries
    (nightly: one date, not yet scored), ``reference_filter(row) -> bool`` the reference
    candidates (nightly: none captured after the date); ``carried_scores`` are kept rows
    merged into the output."""
    heads = heads_hash(config.checkpoint)
    mid = model_id(config.backbone, heads)
    spec = config.backbone

    manifest = p | "ReadManifest" >> ReadManifest(config.manifest)
    rows = manifest["rows"]
    queries = rows | "Queries" >> beam.Filter(
        lambda r, keep: r.role == "query" and (keep is None or keep(r)), query_filter)

    candidates = rows if reference_filter is None else rows | "References" >> beam.Filter(
        lambda r, keep: r.role != "reference" or keep(r), reference_filter)
    drawn = candidates | "SelectReferences" >> SelectReferences(config.k, config.seeds)
    threads = config.decode_threads or default_decode_threads(spec)
    ref_images = (distinct_references(drawn["sets"])
                  | "LoadReferenceImages" >> LoadImages(
                      spec, config.max_pixels, config.min_side, threads, config.batch_size))
    ref_features = ref_images["images"] | "ExtractReferenceFeatures" >> extract_features(
        config.feature_cache, spec, config.batch_size, config.share_model_across_processes)
    ref_sets = (
        {"sets": drawn["sets"],
         "features": ref_features | "RowOnly" >> beam.MapTuple(lambda key, f: (key[0], f))}
        | "AssembleReferenceSets" >> AssembleReferenceSets()
    )
    prompts = queries | "EncodePrompts" >> EncodePrompts(
        spec, config.semantic_classes, config.feature_cache,
        text_on_cpu=config.share_model_across_processes)

    # Queries reach the fused decode → backbone → scoring stage in per-group chunks of a few
    # batches, so each batch is scored against one group's prepared references.
    query_images = queries | "LoadQueryImages" >> LoadImages(
        spec, config.max_pixels, config.min_side, threads, config.batch_size,
        group_chunk=QUERY_CHUNK_BATCHES * config.batch_size)
    # On a GPU the query features stay on the device for the fused ScoreQueries (no 2.4 MB
    # round trip per image through host memory); a model served from another process
    # returns host tensors anyway.
    on_device = spec.device.startswith("cuda") and not config.share_model_across_processes
    query_features = query_images["images"] | "ExtractQueryFeatures" >> ExtractFeatures(
        spec, config.batch_size, config.share_model_across_processes, on_device=on_device)
    scored = query_features | "ScoreQueries" >> ScoreQueries(config, mid, ref_sets, prompts)

    row_errors = (
        (manifest[ERROR_TAG], drawn[ERROR_TAG], ref_images[ERROR_TAG], query_images[ERROR_TAG])
        | "MergeRowErrors" >> beam.Flatten()
        | "ErrorRecords" >> beam.FlatMap(
            lambda e: error_records(e, config.seeds, config.run_id, mid))
    )
    errors = (row_errors, scored[ERROR_TAG]) | "AllErrors" >> beam.Flatten()
    scores = scored["scores"]
    if carried_scores is not None:
        scores = (scores, carried_scores) | "WithCarriedScores" >> beam.Flatten()

    datasets = (queries | "QueryDatasets" >> beam.Map(lambda r: r.dataset)
                | "DistinctDatasets" >> beam.Distinct())
    committed_scores = scores | "WriteScores" >> WritePartitioned(
        config.output, SCORES, scores_schema(manifest_schema, config.write_patch_map),
        config.run_date, config.run_id, datasets=datasets)
    committed_errors = errors | "WriteErrors" >> WritePartitioned(
        config.output, ERRORS, ERROR_SCHEMA, config.run_date, config.run_id, datasets=datasets)
    scores | "SummarizeMetrics" >> SummarizeMetrics(
        f"{config.output}/{SUMMARY}/run_date={config.run_date}",
        extra={"run_id": config.run_id, "model_id": mid, "run_date": config.run_date,
               "k": config.k, "seeds": list(config.seeds), "precision": spec.precision})
    committed = (committed_scores, committed_errors) | "Committed" >> beam.Flatten()
    return JobOutputs(scores=scores, errors=errors, committed=committed)


def parse_score_args(argv: Sequence[str] | None) -> tuple[ScoreConfig, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline score",
        description="Score every query image of a manifest against few-shot normal references.",
    )
    add_score_flags(parser)
    args, beam_args = parser.parse_known_args(argv)
    return score_config_from_args(args), beam_args


def run_config(config: ScoreConfig, beam_args: Sequence[str]) -> beam.runners.runner.PipelineResult:
    """Validate inputs, then build and run the job; blocks until it finishes."""
    schema = validate_manifest_schema(config.manifest)
    # Hashing the checkpoint here makes a missing one fail now, not on a worker.
    mid = model_id(config.backbone, heads_hash(config.checkpoint))
    options = PipelineOptions(list(beam_args), save_main_session=False)
    LOG.info("Scoring %s → %s (k=%d, seeds=%s, model=%s, run %s, date %s)",
             config.manifest, config.output, config.k, config.seeds, mid, config.run_id,
             config.run_date)
    p = beam.Pipeline(runner=make_runner(options), options=options)
    build_pipeline(p, config, schema)
    result = p.run()
    result.wait_until_finish()
    return result


def run(argv: Sequence[str] | None = None) -> beam.runners.runner.PipelineResult:
    """Entry point of ``python -m pipeline score``."""
    config, beam_args = parse_score_args(argv)
    return run_config(config, beam_args)
