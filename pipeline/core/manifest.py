"""The input manifest: a Parquet table listing the images to score.

One row per image. Required columns say where the image is (``image_uri``),
which dataset it belongs to and whether it is a ``query`` to score, a normal
``reference`` or a normal ``calibration`` image held out from the references (read and
kept, not scored). Optional columns refine it; any other column passes through to
the output unchanged.

This module validates the manifest (schema up front, rows one by one so a bad
row becomes a :class:`RowError` instead of failing the job) and writes
manifests; ``make_manifest`` builds them from datasets as they ship and plain folders.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import posixpath
from collections.abc import Callable, Mapping
from typing import Any, Optional

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

LOG = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("image_uri", "dataset", "role")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "category",
    "label",
    "image_id",
    "defect_type",
    "capture_date",
    "mask_uri",
)
#: query: scored; reference: a normal prompt image; calibration: a normal image held out
#: from the references for calibrating decisions (read and kept; the scoring job neither
#: scores it nor draws it as a reference).
ROLES: tuple[str, ...] = ("query", "reference", "calibration")


STAGE_READ_MANIFEST = "read_manifest"



class ManifestSchemaError(ValueError):
    """The manifest cannot be used at all: unreadable, or columns missing or mistyped."""


# --------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string_type(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
    )


def _is_label_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_null(t)


def _is_date_type(t: pa.DataType) -> bool:
    return (
        pa.types.is_date(t)
        or pa.types.is_timestamp(t)
        or _is_string_type(t)
        or pa.types.is_null(t)
    )


def _is_optional_string_type(t: pa.DataType) -> bool:
    return _is_string_type(t) or pa.types.is_null(t)


# column -> (accepts the type?, human description of what is expected)
_TYPE_RULES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "image_uri": (_is_string_type, "string"),
    "dataset": (_is_string_type, "string"),
    "role": (_is_string_type, "string"),
    "category": (_is_optional_string_type, "string (or all null)"),
    "image_id": (_is_optional_string_type, "string (or all null)"),
    "defect_type": (_is_optional_string_type, "string (or all null)"),
    "mask_uri": (_is_optional_string_type, "string (or all null)"),
    "label": (
        _is_label_type,
        "integer, nullable (0 normal, 1 anomalous; in pandas use dtype 'Int64')",
    ),
    "capture_date": (
        _is_date_type,
        "date32, timestamp or 'YYYY-MM-DD' string",
    ),
}


def schema_problems(schema: pa.Schema) -> list[str]:
    """List what is wrong with a manifest schema, one readable line per problem."""
    problems = []
    names = set(schema.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        problems.append(
            f"missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: "
            f"{', '.join(schema.names) or 'no columns'})"
        )
    for column, (accepts, expected) in _TYPE_RULES.items():
        if column not in names:
            continue
        found = schema.field(column).type
        if not accepts(found):
            problems.append(
                f"column {column!r} has type {found}, expected {expected}"
            )
    return problems


def check_schema(schema: pa.Schema, source: str = "manifest") -> None:
    """Raise one ManifestSchemaError listing every schema problem of ``source``."""
    problems = schema_problems(schema)
    if problems:
        raise ManifestSchemaError(
            f"invalid manifest {source}: " + "; ".join(problems)
        )


def _parquet_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Data files of a Parquet dataset directory, skipping _metadata and hidden files."""
    files = []
    for f in sorted(fs.find(path)):
        base = posixpath.basename(f.rstrip("/"))
        if base.startswith((".", "_")):
            continue
        files.append(f)
    return files


def _read_file_schema(fs: fsspec.AbstractFileSystem, path: str, shown: str) -> pa.Schema:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestSchemaError(
            f"manifest {shown} is not a readable Parquet file: {exc}"
        ) from exc


def _manifest_files(path: str) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ManifestSchemaError(f"cannot open manifest {path!r}: {exc}") from exc
    if not fs.exists(fs_path):
        raise ManifestSchemaError(f"manifest not found: {path}")
    if fs.isdir(fs_path):
        files = _parquet_files(fs, fs_path)
        if not files:
            raise ManifestSchemaError(
                f"manifest directory {path} contains no Parquet files"
            )
    else:
        files = [fs_path]
    return fs, fs_path, files


def manifest_files(path: str) -> list[str]:
    """The data files a manifest path names (the file itself, or every non-hidden file of a
    folder, recursively), as URLs: exactly the files validation checks and the job reads."""
    fs, _, files = _manifest_files(path)
    return [fs.unstrip_protocol(f) if "://" in path else f for f in files]


def validate_manifest_schema(path: str) -> pa.Schema:
    """Read only the Parquet schema of the manifest at ``path`` and check it.

    ``path`` is a local path or any fsspec URL, naming a Parquet file or a
    directory of Parquet files (each file is checked). Fails early, before a
    job starts, with one message naming every bad column.

    Raises:
        ManifestSchemaError: the manifest is missing, not Parquet, or has
            missing or mistyped columns.
    """
    fs, fs_path, files = _manifest_files(path)

    schemas = []
    for f in files:
        shown = path if len(files) == 1 and f == fs_path else f"{path} (file {f})"
        schema = _read_file_schema(fs, f, shown)
        check_schema(schema, shown)
        schemas.append(schema)
    if len(schemas) == 1:
        return schemas[0]
    try:
        return pa.unify_schemas(schemas)
    except (pa.ArrowException, ValueError) as exc:
        raise ManifestSchemaError(
            f"files of manifest directory {path} have conflicting schemas: {exc}"
        ) from exc


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One valid, normalised manifest row.

    ``extra`` holds pass-through columns as ``(name, value)`` pairs so that the
    row stays hashable and picklable. ``mask_uri`` is the binary ground-truth
    mask of the defect (nonzero pixels are defective), None for normal images
    and wherever no mask is known; it comes last so that rows built
    positionally keep working.
    """

    image_uri: str
    dataset: str
    category: str
    role: str
    label: Optional[int]
    image_id: str
    defect_type: Optional[str]
    capture_date: Optional[str]
    extra: tuple[tuple[str, Any], ...] = ()
    mask_uri: Optional[str] = None

    def to_record(self) -> dict[str, Any]:
        """The row as a flat dict, pass-through columns included."""
        record = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }
        record.update(self.extra)
        return record


@dataclasses.dataclass(frozen=True)
class RowError:
    """Why one manifest row could not be processed, and at which stage."""

    image_uri: Optional[str]
    dataset: Optional[str]
    category: Optional[str]
    image_id: Optional[str]
    role: Optional[str]
    stage: str
    reason: str

    def to_record(self) -> dict[str, Any]:
        """The error as a flat dict, for writing to an errors table."""
        return dataclasses.asdict(self)


def default_image_id(image_uri: str) -> str:
    """Stable id for an image without one: the first 16 hex digits of sha1(URI)."""
    return hashlib.sha1(image_uri.encode("utf-8")).hexdigest()[:16]


def _is_missing(value: Any) -> bool:
    """True for None and for the null markers pandas and numpy use (NaN, NaT, NA)."""
    if value is None:
        return True
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _text(value: Any) -> Optional[str]:
    """A stripped string, or None for null / empty values."""
    if _is_missing(value):
        return None
    text = str(value).strip()
    return text or None


def _normalize_label(value: Any) -> tuple[Optional[int], Optional[str]]:
    """(label, problem): accepts 0/1 as int or integral float; null means unknown."""
    if _is_missing(value):
        return None, None
    if isinstance(value, (bool, str, bytes)):
        return None, f"label {value!r} is not 0, 1 or null"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, f"label {value!r} is not 0, 1 or null"
    if number in (0.0, 1.0):
        return int(number), None
    return None, f"label {value!r} is not 0, 1 or null"


def _normalize_date(value: Any) -> tuple[Optional[str], Optional[str]]:
    """(YYYY-MM-DD, problem) from a date, datetime, timestamp or ISO string."""
    if _is_missing(value):
        return None, None
    if isinstance(value, dt.datetime):  # before date: datetime is a date subclass
        return value.date().isoformat(), None
    if isinstance(value, dt.date):
        return value.isoformat(), None
    if isinstance(value, str):
        text = value.strip()
        try:
            return dt.date.fromisoformat(text).isoformat(), None
        except ValueError:
            pass
        try:
            return dt.datetime.fromisoformat(text).date().isoformat(), None
        except ValueError:
            return None, f"capture_date {value!r} is not an ISO date (YYYY-MM-DD)"
    try:  # numpy.datetime64 and similar
        return pd.Timestamp(value).date().isoformat(), None
    except (TypeError, ValueError):
        return None, f"capture_date {value!r} is not a date"


def normalize_row(raw: Mapping[str, Any]) -> ManifestRow | RowError:
    """Turn one raw manifest row into a ManifestRow, or a RowError saying why not.

    Fills defaults (category ← dataset, image_id ← hash of the URI), lower-cases
    the role and normalises capture_date to 'YYYY-MM-DD'. Never raises for bad
    row contents: every problem found is reported in one RowError with stage
    ``read_manifest``.
    """
    problems = []

    uri_value = raw.get("image_uri")
    image_uri = uri_value.strip() if isinstance(uri_value, str) else None
    if not image_uri:
        if _is_missing(uri_value) or isinstance(uri_value, str):
            problems.append("image_uri is missing or empty")
        else:
            problems.append(f"image_uri {uri_value!r} is not a string")

    dataset = _text(raw.get("dataset"))
    if dataset is None:
        problems.append("dataset is missing or empty")

    role_text = _text(raw.get("role"))
    role = role_text.lower() if role_text else None
    if role is None:
        problems.append(f"role is missing (allowed: {', '.join(ROLES)})")
    elif role not in ROLES:
        problems.append(
            f"unknown role {role_text!r} (allowed: {', '.join(ROLES)})"
        )

    label, label_problem = _normalize_label(raw.get("label"))
    if label_problem:
        problems.append(label_problem)

    capture_date, date_problem = _normalize_date(raw.get("capture_date"))
    if date_problem:
        problems.append(date_problem)

    category = _text(raw.get("category")) or dataset
    image_id = _text(raw.get("image_id"))
    if image_id is None and image_uri:
        image_id = default_image_id(image_uri)

    if problems:
        return RowError(
            image_uri=image_uri if image_uri else None,
            dataset=dataset,
            category=category,
            image_id=image_id,
            role=role_text,
            stage=STAGE_READ_MANIFEST,
            reason="; ".join(problems),
        )

    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    return ManifestRow(
        image_uri=image_uri,
        dataset=dataset,
        category=category,
        role=role,
        label=label,
        image_id=image_id,
        defect_type=_text(raw.get("defect_type")),
        capture_date=capture_date,
        extra=tuple((k, v) for k, v in raw.items() if k not in known),
        mask_uri=_text(raw.get("mask_uri")),
    )


_STRING_COLUMNS = (
    "image_uri", "image_id", "dataset", "category", "role", "defect_type", "mask_uri",
)


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    """Arrow table with the manifest's column types (label as nullable int64)."""
    df = df.copy()
    if "label" in df.columns:
        df["label"] = df["label"].astype("Int64")
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [
        field.with_type(pa.string())
        if field.name in _STRING_COLUMNS and pa.types.is_null(field.type)
        else field
        for field in table.schema
    ]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def write_manifest(df: pd.DataFrame, path: str) -> None:
    """Write a manifest DataFrame as one Parquet file at a local path or fsspec URL.

    The schema is checked first, so an invalid manifest is never written.
    All-null string columns are stored as strings, labels as nullable int64.
    """
    table = _to_arrow(df)
    check_schema(table.schema, "to write")
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as f:
        pq.write_table(table, f)
