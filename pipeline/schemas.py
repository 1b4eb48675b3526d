"""Output table schemas and the partitioned layout, in one place.

Tables are hive-partitioned as ``<output>/<table>/dataset=<d>/run_date=<YYYY-MM-DD>/``; the
partition columns live in the folder names, not inside the files.
"""
from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

from pipeline.manifest import OPTIONAL_COLUMNS, REQUIRED_COLUMNS

SCORES = "scores"
ERRORS = "errors"
SUMMARY = "summary"
PARTITION_COLUMNS = ("dataset", "run_date")
UNKNOWN_DATASET = "_unknown"

_SCORE_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("category", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("defect_type", pa.string()),
    pa.field("capture_date", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("k", pa.int64()),
    pa.field("k_used", pa.int64()),
    pa.field("reference_ids", pa.list_(pa.string())),
    pa.field("final_score", pa.float64()),
    pa.field("fine_score", pa.float64()),
    pa.field("holistic_score", pa.float64()),
    pa.field("image_residual_score", pa.float64()),
    pa.field("text_prior_score", pa.float64()),
    pa.field("scoring_mode", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("backbone", pa.string()),
    pa.field("pretrained", pa.string()),
    pa.field("heads_hash", pa.string()),
    pa.field("run_id", pa.string()),
]
PATCH_MAP_FIELD = pa.field("patch_map", pa.list_(pa.float32()))

ERROR_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("category", pa.string()),
    pa.field("role", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("model_id", pa.string()),
])

_MANIFEST_COLUMNS = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)


def passthrough_fields(manifest_schema: pa.Schema) -> list[pa.Field]:
    """Manifest columns that are not ours travel to the scores table with their own types."""
    taken = {f.name for f in _SCORE_FIELDS} | set(PARTITION_COLUMNS) | {"patch_map", "role"}
    return [f for f in manifest_schema if f.name not in _MANIFEST_COLUMNS and f.name not in taken]


def scores_schema(manifest_schema: pa.Schema | None, patch_map: bool) -> pa.Schema:
    fields = list(_SCORE_FIELDS)
    if patch_map:
        fields.append(PATCH_MAP_FIELD)
    if manifest_schema is not None:
        fields.extend(passthrough_fields(manifest_schema))
    return pa.schema(fields)


def partition_value(value: Any) -> str:
    """A dataset name as a safe folder value (hive style)."""
    if value is None or value == "":
        return UNKNOWN_DATASET
    text = str(value)
    for ch in '/\\=:*?"<>|\n':
        text = text.replace(ch, "_")
    return text


def partition_dir(root: str, table: str, dataset: str, run_date: str) -> str:
    return f"{root}/{table}/dataset={partition_value(dataset)}/run_date={run_date}"


def to_table(records: Iterable[dict], schema: pa.Schema) -> pa.Table:
    """Records (dicts with possibly extra keys) as a table of exactly ``schema``."""
    records = list(records)
    columns = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)
