"""Where a run's outputs live under the output root; the one module that knows the layout.

```
OUT/scores/dataset=<d>/run_date=<YYYY-MM-DD>/part-*.parquet  + _SUCCESS
OUT/errors/dataset=<d>/run_date=<YYYY-MM-DD>/part-*.parquet  + _SUCCESS
OUT/summary/run_date=<YYYY-MM-DD>/summary.{parquet,json,md}
OUT/_staging/<run_id>/...        (a run's files before they are committed)
OUT/_feature_cache/...           (the nightly job's default feature cache)
```

A partition folder is committed once it holds the ``_SUCCESS`` marker. While a commit swaps
it, hidden folders beside it (``.run_date=<d>.incoming-<run_id>``, ``.run_date=<d>.old-<run_id>``)
hold the new and the retired files. Folders starting with ``_`` or ``.`` are skipped by
hive-partitioned readers (pyarrow, pandas, DuckDB), so staging, cache and commit folders never
show up as rows; :func:`read_partition` also leaves out partitions without the marker.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.core.schemas import SCORES, SUMMARY

LOG = logging.getLogger(__name__)

PARTITION_COLUMNS = ("dataset", "run_date")
UNKNOWN_DATASET = "_unknown"
FEATURE_CACHE_DIR = "_feature_cache"
STAGING_DIR = "_staging"
SUCCESS_MARKER = "_SUCCESS"
INCOMING, RETIRED = "incoming", "old"

#: The partition folders' values, always strings: a dataset named "123" or a date is never
#: type-inferred. Segments are taken as written (no URI decoding), as ``partition_value`` made them.
PARTITION_SCHEMA = pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS])
PARTITIONING = pads.HivePartitioning(PARTITION_SCHEMA, segment_encoding="none")


def partition_value(value: Any) -> str:
    """A dataset name as a safe folder value (hive style)."""
    if value is None or value == "":
        return UNKNOWN_DATASET
    text = str(value)
    for ch in '/\\=:*?"<>|\n':
        text = text.replace(ch, "_")
    return text


def table_dir(root: str, table: str) -> str:
    """The folder of one output table (``scores``, ``errors``)."""
    return f"{root}/{table}"


def partition_name(run_date: str) -> str:
    """The name of a ``run_date`` partition folder, inside its dataset's folder."""
    return f"run_date={run_date}"


def partition_dir(root: str, table: str, dataset: str, run_date: str) -> str:
    """The folder of one dataset's ``run_date`` partition of ``table``."""
    return f"{table_dir(root, table)}/dataset={partition_value(dataset)}/{partition_name(run_date)}"


def partition_glob(root: str, table: str, run_date: str) -> str:
    """A glob of every dataset's ``run_date`` partition folder of ``table``."""
    return f"{table_dir(root, table)}/dataset=*/{partition_name(run_date)}"


def aside_dir(partition: str, kind: str, run_id: str) -> str:
    """The hidden folder beside ``partition`` where run ``run_id``'s commit keeps the new
    (``INCOMING``) or the retired (``RETIRED``) files while it swaps them."""
    parent, _, name = partition.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{kind}-{run_id}"


def aside_glob(partition: str) -> str:
    """A glob of every hidden folder commits of ``partition`` (itself a glob or not) left."""
    parent, _, name = partition.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.*"


def is_retired(path: str) -> bool:
    """Whether ``path`` is a commit's retired copy of a partition (see :func:`aside_dir`)."""
    return f".{RETIRED}-" in path.rstrip("/").rpartition("/")[2]


def summary_dir(root: str, run_date: str) -> str:
    """The folder of a date's summary (and drift, nightly) files."""
    return f"{root}/{SUMMARY}/run_date={run_date}"


def staging_root(root: str, run_id: str) -> str:
    """Where a run writes its files before they are committed."""
    return f"{root}/{STAGING_DIR}/{run_id}"


def feature_cache_dir(root: str) -> str:
    """The default feature cache of jobs that keep one beside their outputs."""
    return f"{root}/{FEATURE_CACHE_DIR}"


# --------------------------------------------------------------------------------------------
# Reading committed partitions back
# --------------------------------------------------------------------------------------------


def _name(path: str) -> str:
    return path.rpartition("/")[2]


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _committed_files(output: str, table: str, run_date: str | None = None
                     ) -> list[pads.FileFragment]:
    """Every file (markers included) of the committed partitions of ``table`` (of ``run_date``
    only, when given), each knowing its partition values."""
    fs, root = fsspec.core.url_to_fs(table_dir(output, table))
    if not fs.exists(root):
        return []
    # Hidden ('.') folders, a commit's incoming and retired copies, are skipped; '_' files are
    # kept so that the markers are seen. The schema is given, so no file is opened here.
    found = pads.dataset(root, filesystem=fs, format="parquet", partitioning=PARTITIONING,
                         schema=PARTITION_SCHEMA, ignore_prefixes=["."])
    where = None if run_date is None else pc.field("run_date") == run_date
    files = list(found.get_fragments(filter=where))
    committed = {_parent(f.path) for f in files if _name(f.path) == SUCCESS_MARKER}
    return [f for f in files if _parent(f.path) in committed]


def read_partition(output: str, date: str, table: str = SCORES,
                   columns: Sequence[str] | None = None) -> pa.Table | None:
    """Every dataset's committed ``date`` rows of ``table`` (all columns, or ``columns``) plus
    a string ``dataset`` column (the folder value), or None when the date has no data file.

    Files whose columns differ (written by different runs) are read with their schemas
    unified; a column a file lacks reads as null.
    """
    parts = [f for f in _committed_files(output, table, date)
             if f.path.endswith(".parquet") and not _name(f.path).startswith(("_", "."))]
    if not parts:
        return None
    schema = pa.unify_schemas([f.physical_schema for f in parts] + [PARTITION_SCHEMA],
                              promote_options="permissive")
    data = pads.FileSystemDataset(parts, schema, pads.ParquetFileFormat(),
                                  filesystem=parts[0].filesystem)
    if columns is None:
        columns = [n for n in schema.names if n not in PARTITION_COLUMNS]
    wanted = [c for c in columns if c != "dataset"] + ["dataset"]
    return data.to_table(columns=wanted)


def committed_dates(output: str, table: str = SCORES) -> list[str]:
    """Dates with at least one committed partition of ``table``, oldest first."""
    dates = {pads.get_partition_keys(f.partition_expression).get("run_date")
             for f in _committed_files(output, table) if _name(f.path) == SUCCESS_MARKER}
    return sorted(d for d in dates if d)


def previous_date(output: str, date: str) -> str | None:
    """The latest date before ``date`` with committed scores: the 'previous night' for drift."""
    earlier = [d for d in committed_dates(output) if d < date]
    return earlier[-1] if earlier else None
