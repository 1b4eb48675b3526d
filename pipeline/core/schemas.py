"""Output table names and schemas, in one place (the folder layout is ``layout``).

The partition columns (``dataset``, ``run_date``) live in the folder names, not in the files.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa

from pipeline.core.manifest import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from pipeline.model.scorers.registry import components

SCORES = "scores"
ERRORS = "errors"
SUMMARY = "summary"
#: Namespace of every Beam counter and distribution the job reports.
METRICS_NAMESPACE = "inctrl"

_SCORE_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("category", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("defect_type", pa.string()),
    pa.field("capture_date", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("scorer", pa.string()),
    pa.field("k", pa.int64()),
    pa.field("k_used", pa.int64()),
    pa.field("reference_ids", pa.list_(pa.string())),
    pa.field("reference_uris", pa.list_(pa.string())),
    pa.field("reference_selection", pa.string()),
    pa.field("final_score", pa.float64()),
    # every registered scorer's components (``ScorerEntry.components``): InCTRL's fine,
    # holistic, image_residual and text_prior first; null on other scorers' rows
    *(pa.field(f"{name}_score", pa.float64()) for name in components()),
    pa.field("scoring_mode", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("backbone", pa.string()),
    pa.field("pretrained", pa.string()),
    pa.field("heads_hash", pa.string()),
    pa.field("run_id", pa.string()),
]
#: Each query's decision, calibrated on normal images at the stated false-alarm rate
#: (``pipeline.core.calibration``), and with anomaly maps its defect mask's measures.
DECISION_FIELDS = [pa.field("false_alarm_rate", pa.float64()),
                   pa.field("anomaly_p_value", pa.float64()),
                   pa.field("is_anomalous", pa.bool_()),
                   pa.field("calibration_size", pa.int64()),
                   pa.field("decision_threshold", pa.float64()),
                   pa.field("pixel_decision_threshold", pa.float64()),
                   pa.field("defect_area_fraction", pa.float64()),
                   pa.field("defect_regions", pa.int64())]
#: Where a query's anomaly map went (``--write-anomaly-maps``): a 16-bit PNG of the map at
#: the image's own size, normalised to [map_min, map_max], and an overlay PNG for people.
ANOMALY_MAP_FIELDS = [pa.field("anomaly_map_uri", pa.string()),
                      pa.field("overlay_uri", pa.string()),
                      pa.field("map_min", pa.float64()),
                      pa.field("map_max", pa.float64()),
                      pa.field("defect_mask_uri", pa.string())]
#: A scorer's patch map, row-major on its own feature grid (height × width values).
PATCH_MAP_FIELDS = [pa.field("patch_map", pa.list_(pa.float32())),
                    pa.field("patch_map_height", pa.int64()),
                    pa.field("patch_map_width", pa.int64())]

ERROR_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("image_uri", pa.string()),
    pa.field("category", pa.string()),
    pa.field("role", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("scorer", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("model_id", pa.string()),
])

_MANIFEST_COLUMNS = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)


def passthrough_fields(manifest_schema: pa.Schema) -> list[pa.Field]:
    """Manifest columns that are not ours travel to the scores table with their own types."""
    taken = ({f.name for f in _SCORE_FIELDS} | {"dataset", "run_date", "role"}
             | {f.name for f in DECISION_FIELDS}
             | {f.name for f in PATCH_MAP_FIELDS} | {f.name for f in ANOMALY_MAP_FIELDS})
    return [f for f in manifest_schema if f.name not in _MANIFEST_COLUMNS and f.name not in taken]


def scores_schema(manifest_schema: pa.Schema | None, patch_map: bool,
                  anomaly_maps: bool = False) -> pa.Schema:
    fields = list(_SCORE_FIELDS) + list(DECISION_FIELDS)
    if patch_map:
        fields.extend(PATCH_MAP_FIELDS)
    if anomaly_maps:
        fields.extend(ANOMALY_MAP_FIELDS)
    if manifest_schema is not None:
        fields.extend(passthrough_fields(manifest_schema))
    return pa.schema(fields)


def to_table(records: Iterable[dict], schema: pa.Schema) -> pa.Table:
    """Records (dicts with possibly extra keys) as a table of exactly ``schema``."""
    records = list(records)
    columns = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)
