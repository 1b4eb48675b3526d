"""The extraction job: read manifest → load images → extract features into the cache → index.

The backbone is frozen, so each image goes through it once, here, not once per training step.
Features land in the shared on-disk ``FeatureCache`` (content hash + backbone identity), so a
later run, or the scoring job with ``--feature-cache``, finds them again. An index table maps
every usable manifest row to its content hash; rows that cannot be used become error rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.images import ImageLimits
from pipeline.core.manifest import validate_manifest_schema
from pipeline.core.schemas import ERRORS
from pipeline.model.backbone import BackboneSpec
from pipeline.runner import counter, run_pipeline
from pipeline.train.data import EXTRACT_ERROR_SCHEMA, INDEX_SCHEMA, extract_error_record
from transforms.cache import CacheFeatures
from transforms.manifest import ReadManifest

LOG = logging.getLogger(__name__)


def _write_parquet(path_prefix: str, schema: pa.Schema) -> beam.PTransform:
    # One file per table: index rows are small, and a fixed name lets a rerun replace it.
    return beam.io.WriteToParquet(path_prefix, schema, file_name_suffix=".parquet",
                                  num_shards=1, shard_name_template="")


@dataclass(frozen=True)
class ExtractionReport:
    """Where the index and errors went, and what the run did (from the job's counters)."""

    index: dict[str, str]
    errors: str
    indexed: dict[str, int] = field(default_factory=dict)
    failed_rows: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def to_dict(self) -> dict:
        return {"index": dict(self.index), "errors": self.errors, "indexed": dict(self.indexed),
                "failed_rows": self.failed_rows, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses}


def _num_rows(path: str) -> int:
    with fsspec.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def extract_manifests(manifests: Mapping[str, str], cache_root: str, index_root: str,
                      spec: BackboneSpec, batch_size: int, beam_args: Sequence[str] = (),
                      limits: ImageLimits = ImageLimits()) -> ExtractionReport:
    """Fill the cache with the features of every image of ``manifests`` (split → path).

    Writes ``<index_root>/<split>.parquet`` (INDEX_SCHEMA) and ``<index_root>/errors.parquet``
    (EXTRACT_ERROR_SCHEMA); blocks until the job finishes.
    """
    for path in manifests.values():
        validate_manifest_schema(path)
    index_root = index_root.rstrip("/")

    def build(p: beam.Pipeline) -> None:
        errors = []
        for split, path in manifests.items():
            read = p | f"ReadManifest[{split}]" >> ReadManifest(path)
            cached = read["rows"] | f"CacheFeatures[{split}]" >> CacheFeatures(
                cache_root, spec, batch_size, limits)
            cached["index"] | f"WriteIndex[{split}]" >> _write_parquet(
                f"{index_root}/{split}", INDEX_SCHEMA)
            errors.append(
                (read[ERRORS], cached[ERRORS])
                | f"MergeErrors[{split}]" >> beam.Flatten()
                | f"ErrorRecords[{split}]" >> beam.Map(extract_error_record, split))
        (errors | "AllErrors" >> beam.Flatten()
         | "WriteErrors" >> _write_parquet(f"{index_root}/errors", EXTRACT_ERROR_SCHEMA))

    LOG.info("Extracting features of %s into %s (%s)",
             ", ".join(f"{s}={m}" for s, m in manifests.items()), cache_root, spec.backbone_id)
    result = run_pipeline(build, beam_args)

    index = {split: f"{index_root}/{split}.parquet" for split in manifests}
    errors_path = f"{index_root}/errors.parquet"
    report = ExtractionReport(
        index=index,
        errors=errors_path,
        indexed={split: _num_rows(path) for split, path in index.items()},
        failed_rows=_num_rows(errors_path),
        cache_hits=counter(result, "feature_cache_hits") or 0,
        cache_misses=counter(result, "feature_cache_misses") or 0,
    )
    LOG.info("Features ready: %s rows indexed, %d cache hits, %d extracted",
             report.indexed, report.cache_hits, report.cache_misses)
    if report.failed_rows:
        LOG.warning("%d manifest rows could not be used (unreadable images, bad or duplicate "
                    "rows); they are listed in %s", report.failed_rows, errors_path)
    return report
