"""Tests for pipeline.core.manifest: schema checks, row normalisation."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import pickle
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import manifest as m
from tests.badinputs import build_bad_inputs


def _good_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_uri": ["/data/a.png", "gs://bucket/b.png"],
            "dataset": ["mvtec", "mvtec"],
            "role": ["reference", "query"],
            "category": ["bottle", None],
            "label": pd.array([0, None], dtype="Int64"),
            "image_id": [None, "b"],
            "defect_type": [None, None],
            "capture_date": [dt.date(2024, 3, 5), None],
            "operator": ["ann", "bob"],
        }
    )


def _write(table: pa.Table, path) -> str:
    pq.write_table(table, str(path))
    return str(path)


# --------------------------------------------------------------------------
# validate_manifest_schema
# --------------------------------------------------------------------------


def test_good_manifest_passes_and_returns_schema(tmp_path):
    path = str(tmp_path / "manifest.parquet")
    m.write_manifest(_good_frame(), path)

    schema = m.validate_manifest_schema(path)

    assert set(m.REQUIRED_COLUMNS) <= set(schema.names)
    assert "operator" in schema.names
    assert pa.types.is_integer(schema.field("label").type)


def test_directory_of_parquet_files_is_checked_file_by_file(tmp_path):
    good = pa.Table.from_pandas(_good_frame(), preserve_index=False)
    _write(good, tmp_path / "part-0.parquet")
    _write(good, tmp_path / "part-1.parquet")
    (tmp_path / "_SUCCESS").write_text("")

    assert "image_uri" in m.validate_manifest_schema(str(tmp_path)).names

    bad = good.drop_columns(["role"])
    _write(bad, tmp_path / "part-2.parquet")
    with pytest.raises(m.ManifestSchemaError, match="part-2.parquet.*'role'"):
        m.validate_manifest_schema(str(tmp_path))


def test_missing_required_column_names_it(tmp_path):
    table = pa.table({"image_uri": ["a.png"], "dataset": ["d"]})
    path = _write(table, tmp_path / "m.parquet")

    with pytest.raises(m.ManifestSchemaError) as info:
        m.validate_manifest_schema(path)

    message = str(info.value)
    assert "'role'" in message and "missing" in message
    assert "'image_uri'" not in message.split("found")[0]  # only the missing one is blamed


def test_label_stored_as_string_names_column_and_both_types(tmp_path):
    table = pa.table(
        {"image_uri": ["a.png"], "dataset": ["d"], "role": ["query"], "label": ["1"]}
    )
    path = _write(table, tmp_path / "m.parquet")

    with pytest.raises(m.ManifestSchemaError) as info:
        m.validate_manifest_schema(path)

    message = str(info.value)
    assert "'label'" in message
    assert "string" in message  # found
    assert "integer" in message  # expected


def test_float_label_is_rejected_with_pandas_hint(tmp_path):
    table = pa.table(
        {"image_uri": ["a.png"], "dataset": ["d"], "role": ["query"], "label": [1.0]}
    )
    with pytest.raises(m.ManifestSchemaError, match="label.*double.*Int64"):
        m.validate_manifest_schema(_write(table, tmp_path / "m.parquet"))


def test_all_problems_are_reported_in_one_message(tmp_path):
    table = pa.table({"image_uri": [1, 2], "dataset": ["d", "d"], "label": ["x", "y"]})
    path = _write(table, tmp_path / "m.parquet")

    with pytest.raises(m.ManifestSchemaError) as info:
        m.validate_manifest_schema(path)

    message = str(info.value)
    for fragment in ("'role'", "'image_uri'", "int64", "'label'"):
        assert fragment in message


def test_all_null_optional_columns_are_accepted(tmp_path):
    table = pa.table(
        {
            "image_uri": ["a.png"],
            "dataset": ["d"],
            "role": ["query"],
            "label": pa.nulls(1),
            "category": pa.nulls(1),
            "capture_date": pa.array([dt.datetime(2024, 1, 2)], pa.timestamp("us")),
        }
    )
    schema = m.validate_manifest_schema(_write(table, tmp_path / "m.parquet"))
    assert pa.types.is_null(schema.field("label").type)


def test_capture_date_as_integer_is_rejected(tmp_path):
    table = pa.table(
        {"image_uri": ["a"], "dataset": ["d"], "role": ["query"], "capture_date": [20240101]}
    )
    with pytest.raises(m.ManifestSchemaError, match="capture_date"):
        m.validate_manifest_schema(_write(table, tmp_path / "m.parquet"))


def test_missing_file_and_non_parquet_file_raise_schema_error(tmp_path):
    with pytest.raises(m.ManifestSchemaError, match="not found"):
        m.validate_manifest_schema(str(tmp_path / "nope.parquet"))

    text = tmp_path / "manifest.parquet"
    text.write_text("image_uri,dataset,role\na.png,d,query\n")
    with pytest.raises(m.ManifestSchemaError, match="not a readable Parquet"):
        m.validate_manifest_schema(str(text))

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(m.ManifestSchemaError, match="no Parquet files"):
        m.validate_manifest_schema(str(tmp_path / "empty_dir"))


def test_fsspec_url_round_trip():
    url = f"memory://manifests/{uuid.uuid4().hex}/m.parquet"
    m.write_manifest(_good_frame(), url)
    assert "dataset" in m.validate_manifest_schema(url).names


def test_write_manifest_refuses_invalid_frame(tmp_path):
    df = _good_frame().drop(columns=["dataset"])
    path = tmp_path / "m.parquet"
    with pytest.raises(m.ManifestSchemaError, match="dataset"):
        m.write_manifest(df, str(path))
    assert not path.exists()


def test_write_manifest_turns_float_labels_into_nullable_ints(tmp_path):
    df = _good_frame()
    df["label"] = [0.0, float("nan")]  # what pandas makes of [0, None]
    path = str(tmp_path / "m.parquet")
    m.write_manifest(df, path)
    assert pq.read_schema(path).field("label").type == pa.int64()
    assert pd.read_parquet(path)["label"].isna().tolist() == [False, True]


# --------------------------------------------------------------------------
# normalize_row
# --------------------------------------------------------------------------


def test_default_image_id_is_a_stable_hash_of_the_uri():
    uri = "gs://bucket/x/000.png"
    expected = hashlib.sha1(uri.encode()).hexdigest()[:16]
    assert m.default_image_id(uri) == expected
    assert m.default_image_id(uri) == m.default_image_id(str(uri))
    assert m.default_image_id(uri) != m.default_image_id("gs://bucket/x/001.png")


def test_normalize_row_fills_defaults_and_keeps_extras():
    row = m.normalize_row(
        {
            "image_uri": " /data/a.png ",
            "dataset": "mvtec",
            "role": " Query ",
            "category": None,
            "label": np.int64(1),
            "image_id": float("nan"),
            "defect_type": "scratch",
            "capture_date": "2024-03-05",
            "operator": "ann",
            "batch": 7,
        }
    )
    assert isinstance(row, m.ManifestRow)
    assert row.image_uri == "/data/a.png"
    assert row.category == "mvtec"
    assert row.role == "query"
    assert row.label == 1 and isinstance(row.label, int)
    assert row.image_id == m.default_image_id("/data/a.png")
    assert row.defect_type == "scratch"
    assert row.capture_date == "2024-03-05"
    assert row.extra == (("operator", "ann"), ("batch", 7))
    assert row.to_record()["operator"] == "ann"


def test_normalize_row_keeps_given_category_and_image_id():
    row = m.normalize_row(
        {"image_uri": "a.png", "dataset": "d", "role": "reference",
         "category": "bottle", "image_id": "img-1"}
    )
    assert (row.category, row.image_id, row.label, row.capture_date) == (
        "bottle", "img-1", None, None)


@pytest.mark.parametrize(
    "value",
    [
        dt.date(2024, 3, 5),
        dt.datetime(2024, 3, 5, 23, 59),
        pd.Timestamp("2024-03-05 10:00"),
        np.datetime64("2024-03-05"),
        "2024-03-05",
        "2024-03-05T10:00:00",
    ],
)
def test_capture_date_is_normalised_to_iso_day(value):
    row = m.normalize_row(
        {"image_uri": "a", "dataset": "d", "role": "query", "capture_date": value}
    )
    assert isinstance(row, m.ManifestRow)
    assert row.capture_date == "2024-03-05"


@pytest.mark.parametrize(
    "label, expected", [(0, 0), (1, 1), (1.0, 1), (None, None), (math.nan, None), (pd.NA, None)]
)
def test_valid_labels(label, expected):
    row = m.normalize_row({"image_uri": "a", "dataset": "d", "role": "query", "label": label})
    assert isinstance(row, m.ManifestRow)
    assert row.label == expected


@pytest.mark.parametrize(
    "changes, keywords",
    [
        ({"image_uri": None}, ["image_uri", "missing"]),
        ({"image_uri": "  "}, ["image_uri", "empty"]),
        ({"image_uri": math.nan}, ["image_uri"]),
        ({"image_uri": 42}, ["image_uri", "not a string"]),
        ({"dataset": None}, ["dataset"]),
        ({"role": "train"}, ["'train'", "query", "reference", "calibration"]),
        ({"role": None}, ["role", "missing"]),
        ({"label": 2}, ["label", "2"]),
        ({"label": 0.5}, ["label"]),
        ({"label": "1"}, ["label"]),
        ({"label": True}, ["label"]),
        ({"capture_date": "05/03/2024"}, ["capture_date", "YYYY-MM-DD"]),
    ],
)
def test_bad_rows_become_row_errors(changes, keywords):
    raw = {"image_uri": "gs://b/a.png", "dataset": "d", "role": "query", "category": "c"}
    raw.update(changes)

    result = m.normalize_row(raw)

    assert isinstance(result, m.RowError)
    assert result.stage == "read_manifest"
    for keyword in keywords:
        assert keyword in result.reason


def test_calibration_is_a_role():
    """Normal images held out from the references (MVTec LOCO AD's and MVTec AD 2's
    validation/good): valid rows, lower-cased like the other roles."""
    row = m.normalize_row({"image_uri": "a.png", "dataset": "d", "role": " Calibration ",
                           "label": 0})
    assert isinstance(row, m.ManifestRow) and row.role == "calibration"
    assert m.ROLES == ("query", "reference", "calibration")


def test_row_error_reports_every_problem_and_keeps_identity():
    raw = {"image_uri": "gs://b/a.png", "dataset": "d", "role": "train", "label": 7}
    err = m.normalize_row(raw)
    assert isinstance(err, m.RowError)
    assert "train" in err.reason and "label" in err.reason
    assert err.image_uri == "gs://b/a.png"
    assert err.category == "d"
    assert err.image_id == m.default_image_id("gs://b/a.png")
    assert err.role == "train"

    record = err.to_record()
    assert set(record) == {
        "image_uri", "dataset", "category", "image_id", "role", "stage", "reason"}
    assert record["reason"] == err.reason


def test_rows_are_hashable_and_picklable():
    row = m.normalize_row({"image_uri": "a", "dataset": "d", "role": "query", "x": 1})
    err = m.normalize_row({"image_uri": None, "dataset": "d", "role": "query"})
    for value in (row, err):
        assert pickle.loads(pickle.dumps(value)) == value
        assert hash(value) == hash(pickle.loads(pickle.dumps(value)))


def test_bad_inputs_manifest_is_schema_valid_and_only_unknown_role_fails_here(tmp_path):
    df = build_bad_inputs(str(tmp_path / "files"))
    path = str(tmp_path / "bad.parquet")
    m.write_manifest(df, path)
    m.validate_manifest_schema(path)

    rows = pd.read_parquet(path).to_dict("records")
    errors = {r["case"] for r in rows if isinstance(m.normalize_row(r), m.RowError)}
    assert errors == {"unknown_role"}
    # Pass-through columns survive normalisation.
    first = m.normalize_row(rows[0])
    assert dict(first.extra)["expect"] == "reference"


# --------------------------------------------------------------------------
# mask_uri
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [(" /gt/a_mask.png ", "/gt/a_mask.png"), ("", None), ("   ", None), (None, None),
     (math.nan, None), (pd.NA, None)],
)
def test_mask_uri_is_an_optional_string_not_a_pass_through(value, expected):
    row = m.normalize_row({"image_uri": "a", "dataset": "d", "role": "query", "label": 1,
                           "mask_uri": value, "operator": "ann"})
    assert isinstance(row, m.ManifestRow)
    assert row.mask_uri == expected
    assert row.extra == (("operator", "ann"),)
    assert row.to_record()["mask_uri"] == expected
    assert "mask_uri" in m.OPTIONAL_COLUMNS


def test_rows_without_mask_uri_column_have_none():
    row = m.normalize_row({"image_uri": "a", "dataset": "d", "role": "query"})
    assert row.mask_uri is None


def test_positional_rows_keep_working_and_mask_uri_comes_last():
    positional = m.ManifestRow("/a.png", "d", "c", "query", 1, "a", "hole", None)
    with_extra = m.ManifestRow("/a.png", "d", "c", "query", 1, "a", "hole", None, (("x", 1),))
    assert positional.mask_uri is None and positional.extra == ()
    assert with_extra.extra == (("x", 1),) and with_extra.mask_uri is None
    names = [f.name for f in dataclasses.fields(m.ManifestRow)]
    assert names[-2:] == ["extra", "mask_uri"]
    masked = m.ManifestRow("/a.png", "d", "c", "query", 1, "a", "hole", None, mask_uri="/gt/a.png")
    assert pickle.loads(pickle.dumps(masked)) == masked and masked != positional


def test_mask_uri_column_type_is_checked_and_kept_out_of_pass_through(tmp_path):
    from pipeline.core.schemas import passthrough_fields

    table = pa.table({"image_uri": ["a"], "dataset": ["d"], "role": ["query"], "mask_uri": [3]})
    with pytest.raises(m.ManifestSchemaError, match="mask_uri.*string"):
        m.validate_manifest_schema(_write(table, tmp_path / "bad.parquet"))

    frame = _good_frame().assign(mask_uri=[None, None])  # all null: still written as string
    path = str(tmp_path / "m.parquet")
    m.write_manifest(frame, path)
    schema = m.validate_manifest_schema(path)
    assert schema.field("mask_uri").type == pa.string()
    assert [f.name for f in passthrough_fields(schema)] == ["operator"]
