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
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.config import default_decode_threads
from pipeline.manifest import ManifestRow, RowError, validate_manifest_schema
from pipeline.model.backbone import BackboneSpec
from pipeline.run import make_runner
from transforms.cache import CachedExtractFeatures
from transforms.errors import ERRORS
from transforms.images import LoadImages
from transforms.manifest import ReadManifest

LOG = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("category", pa.string()),
    pa.field("role", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("content_hash", pa.string()),
])

EXTRACT_ERROR_SCHEMA = pa.schema([
    pa.field("split", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("dataset", pa.string()),
    pa.field("category", pa.string()),
    pa.field("role", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
])

_NAMESPACE = "inctrl"


def index_record(row: ManifestRow, content_hash: str) -> dict:
    """The index row of one image whose features are in the cache."""
    return {"image_id": row.image_id, "image_uri": row.image_uri, "dataset": row.dataset,
            "category": row.category, "role": row.role, "label": row.label,
            "content_hash": content_hash}


def error_record(error: RowError, split: str) -> dict:
    return dict(error.to_record(), split=split)


class CacheFeatures(beam.PTransform):
    """ManifestRow → ``{'index': index records, 'errors': RowError}``; features go to the cache.

    Images already in the cache are not run through the backbone again (CachedExtractFeatures).
    """

    def __init__(self, cache_root: str, spec: BackboneSpec, batch_size: int,
                 max_pixels: int, min_side: int) -> None:
        super().__init__()
        self._load = LoadImages(spec, max_pixels, min_side, default_decode_threads(spec),
                                batch_size)
        self._extract = CachedExtractFeatures(cache_root, spec, batch_size)

    def expand(self, rows):
        images = rows | "LoadImages" >> self._load
        features = images["images"] | "CachedExtractFeatures" >> self._extract
        index = features | "IndexRecords" >> beam.MapTuple(lambda key, _f: index_record(*key))
        return {"index": index, ERRORS: images[ERRORS]}


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


def counter(result: beam.runners.runner.PipelineResult, name: str) -> int:
    """Sum of the committed values of every ``inctrl`` counter called ``name``."""
    found = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE).with_name(name))
    return int(sum((c.committed or 0) for c in found["counters"]))


def _num_rows(path: str) -> int:
    with fsspec.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def extract_manifests(manifests: Mapping[str, str], cache_root: str, index_root: str,
                      spec: BackboneSpec, batch_size: int, beam_args: Sequence[str] = (),
                      max_pixels: int = 89_478_485, min_side: int = 8) -> ExtractionReport:
    """Fill the cache with the features of every image of ``manifests`` (split → path).

    Writes ``<index_root>/<split>.parquet`` (INDEX_SCHEMA) and ``<index_root>/errors.parquet``
    (EXTRACT_ERROR_SCHEMA); blocks until the job finishes.
    """
    for path in manifests.values():
        validate_manifest_schema(path)
    index_root = index_root.rstrip("/")
    options = PipelineOptions(list(beam_args), save_main_session=False)
    p = beam.Pipeline(runner=make_runner(options), options=options)
    errors = []
    for split, path in manifests.items():
        read = p | f"ReadManifest[{split}]" >> ReadManifest(path)
        cached = read["rows"] | f"CacheFeatures[{split}]" >> CacheFeatures(
            cache_root, spec, batch_size, max_pixels, min_side)
        cached["index"] | f"WriteIndex[{split}]" >> _write_parquet(
            f"{index_root}/{split}", INDEX_SCHEMA)
        errors.append(
            (read[ERRORS], cached[ERRORS])
            | f"MergeErrors[{split}]" >> beam.Flatten()
            | f"ErrorRecords[{split}]" >> beam.Map(error_record, split))
    (errors | "AllErrors" >> beam.Flatten()
     | "WriteErrors" >> _write_parquet(f"{index_root}/errors", EXTRACT_ERROR_SCHEMA))
    LOG.info("Extracting features of %s into %s (%s)",
             ", ".join(f"{s}={m}" for s, m in manifests.items()), cache_root, spec.backbone_id)
    result = p.run()
    result.wait_until_finish()

    index = {split: f"{index_root}/{split}.parquet" for split in manifests}
    errors_path = f"{index_root}/errors.parquet"
    report = ExtractionReport(
        index=index,
        errors=errors_path,
        indexed={split: _num_rows(path) for split, path in index.items()},
        failed_rows=_num_rows(errors_path),
        cache_hits=counter(result, "feature_cache_hits"),
        cache_misses=counter(result, "feature_cache_misses"),
    )
    LOG.info("Features ready: %s rows indexed, %d cache hits, %d extracted",
             report.indexed, report.cache_hits, report.cache_misses)
    if report.failed_rows:
        LOG.warning("%d manifest rows could not be used (unreadable images, bad or duplicate "
                    "rows); they are listed in %s", report.failed_rows, errors_path)
    return report
