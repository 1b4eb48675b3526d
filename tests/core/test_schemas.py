"""Output schemas: our columns first, the manifest's own columns passed through with their types."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from pipeline.core.layout import UNKNOWN_DATASET, partition_dir, partition_value
from pipeline.core.schemas import ERROR_SCHEMA, PATCH_MAP_FIELDS, scores_schema, to_table

MANIFEST = pa.schema([
    ("image_uri", pa.string()), ("dataset", pa.string()), ("role", pa.string()),
    ("label", pa.int64()), ("capture_date", pa.date32()),
    ("batch_no", pa.int32()), ("weight", pa.float32()), ("seen_at", pa.timestamp("us")),
    ("tags", pa.list_(pa.string())),
    ("seed", pa.string()),  # clashes with an output column: ours wins
])


def test_passthrough_columns_keep_their_types():
    schema = scores_schema(MANIFEST, patch_map=False)
    assert schema.field("batch_no").type == pa.int32()
    assert schema.field("weight").type == pa.float32()
    assert schema.field("seen_at").type == pa.timestamp("us")
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("seed").type == pa.int64()
    assert schema.field("capture_date").type == pa.string()  # normalised to YYYY-MM-DD
    assert len(schema.names) == len(set(schema.names))
    for hidden in ("role", "dataset", "run_date", "patch_map"):
        assert hidden not in schema.names


def test_patch_map_column_only_when_asked():
    with_map = scores_schema(None, patch_map=True)
    assert [with_map.field(f.name) for f in PATCH_MAP_FIELDS] == PATCH_MAP_FIELDS
    without = scores_schema(None, patch_map=False).names
    assert not {f.name for f in PATCH_MAP_FIELDS} & set(without)


def test_to_table_fills_missing_and_drops_extra_keys():
    schema = scores_schema(MANIFEST, patch_map=False)
    table = to_table([{"image_id": "a", "seed": 1, "batch_no": 7, "seen_at": dt.datetime(2024, 1, 2),
                       "not_a_column": 1}], schema)
    assert table.schema == schema
    row = table.to_pylist()[0]
    assert (row["image_id"], row["seed"], row["batch_no"], row["weight"]) == ("a", 1, 7, None)


def test_error_schema_names_stage_and_reason():
    assert {"image_id", "image_uri", "category", "role", "seed", "scorer", "stage", "reason",
            "run_id", "model_id"} == set(ERROR_SCHEMA.names)


@pytest.mark.parametrize("value,expected", [
    ("mvtec", "mvtec"), ("a/b=c", "a%2Fb%3Dc"), (None, UNKNOWN_DATASET), ("", "")])
def test_partition_values_are_reversible_folder_names(value, expected):
    assert partition_value(value) == expected
    assert partition_dir("/out", "scores", value, "2024-01-02") == (
        f"/out/scores/dataset={expected}/run_date=2024-01-02")
