"""Where a run's outputs live under the output root, and how readers find the current ones.

```
OUT/scores/dataset=<d>/run_date=<YYYY-MM-DD>/part-<key>-<uuid>.parquet   (+ _SUCCESS)
OUT/errors/dataset=<d>/run_date=<YYYY-MM-DD>/part-<key>-<uuid>.parquet   (+ _SUCCESS)
OUT/maps/run_date=<d>/run=<key>/dataset=<d>/<attempt>/<stem>.{map,overlay}.png
OUT/summary/run_date=<YYYY-MM-DD>/summary.{parquet,json,md}        (+ drift.*, nightly.json)
OUT/_commits/run_date=<d>/<version>.json   one record per commit: every table's files in force
OUT/_reports/run_date=<d>/<key>/...        the summary / drift / nightly files a record names
OUT/_locks/run_date=<d>/<generation>.json  the date's lock (pipeline.core.locks)
OUT/_runs/<key>.json                       a run's registration, until its files are collected
OUT/_staging/run_date=<d>/<key>/...        a run's files before its commit
OUT/_feature_cache/...                     the nightly job's default feature cache
```

``<key>`` is the run's unique key (its commit id, :class:`pipeline.core.commit.CommitPlan`):
every data file a run writes carries it, so no two runs ever write the same name.

Partition values are percent-encoded the way pyarrow's hive partitioning writes and reads them
(``urllib.parse.quote(value, safe="")``; null is ``__HIVE_DEFAULT_PARTITION__``), so
pyarrow, pandas and DuckDB read back the exact value and no two values share a folder.

A date's **commit record** (the highest ``version`` under ``_commits/run_date=<d>/``, created
exclusively, never rewritten) lists, per table, the files in force: per dataset for the
partitioned tables (scores, errors, maps), one set per date for the reports (summary,
drift, nightly). A maps partition names a folder as a whole (its ``prefix``) and the file
listing the bundle attempts whose maps it holds, so a record's size does not grow with the
number of maps. It is the single switch of a commit (``pipeline.core.commit``); the readers
here follow it. Data files are immutable and uniquely named, so a record always means the
same rows. ``_SUCCESS`` markers and the ``summary/run_date=<d>/`` copies are written after the
record, for plain readers and people. Folders starting with ``_`` or ``.`` are skipped by
hive-partitioned readers, so commits, reports, locks, staging and cache never show up as rows.
"""
from __future__ import annotations

import json
import logging
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.core.schemas import ERRORS, SCORES, SUMMARY

LOG = logging.getLogger(__name__)

PARTITION_COLUMNS = ("dataset", "run_date")
#: The folder value of a null partition value (pyarrow's and Hive's default).
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
#: Kept for callers of the former name: rows without a dataset land in the null partition.
UNKNOWN_DATASET = NULL_PARTITION
#: The longest file or folder name (bytes) that local file systems (ext4, xfs, APFS, NTFS)
#: accept; object stores allow more per key, but the same output must work on both.
MAX_NAME_BYTES = 255
FEATURE_CACHE_DIR = "_feature_cache"
STAGING_DIR = "_staging"
COMMITS_DIR = "_commits"
REPORTS_DIR = "_reports"
LOCKS_DIR = "_locks"
RUNS_DIR = "_runs"
SUCCESS_MARKER = "_SUCCESS"
#: The anomaly-map table: folders written in place by the workers, named whole by records.
MAPS = "maps"
#: Tables whose partitions are folders (one per run and dataset) rather than moved files.
FOLDER_TABLES = (MAPS,)
#: In each such folder: the bundle attempts whose files the partition holds (written by the
#: commit; the folders of other attempts are garbage of retried bundles).
ATTEMPTS_FILE = "attempts.json"
#: The tables partitioned by dataset; every other table of a record is a per-date report.
PARTITIONED_TABLES = (SCORES, ERRORS)
#: Report tables a run may commit beside its summary.
DRIFT, NIGHTLY = "drift", "nightly"
RECORD_FORMAT = "inctrl-commit/2"
#: Record formats this version reads (1: before folder partitions and kept notes).
READABLE_FORMATS = ("inctrl-commit/1", RECORD_FORMAT)

#: The partition folders' values, always strings (a dataset named "123" or a date is never
#: type-inferred), percent-decoded as pyarrow writes them.
PARTITION_SCHEMA = pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS])
PARTITIONING = pads.HivePartitioning(PARTITION_SCHEMA, segment_encoding="uri",
                                     null_fallback=NULL_PARTITION)


# --------------------------------------------------------------------------------------------
# Partition values
# --------------------------------------------------------------------------------------------


def partition_value(value: Any) -> str:
    """``value`` as a folder value: percent-encoded like pyarrow's hive partitioning
    (everything but ``A-Z a-z 0-9 _ . - ~``), null as :data:`NULL_PARTITION`. Reversible:
    :func:`decode_value` gives ``value`` back, and distinct values never share a folder."""
    if value is None:
        return NULL_PARTITION
    return urllib.parse.quote(str(value), safe="")


def decode_value(text: str) -> str | None:
    """The value a folder value (:func:`partition_value`) stands for."""
    return None if text == NULL_PARTITION else urllib.parse.unquote(text)


def unstorable_reason(column: str, value: Any) -> str | None:
    """Why ``value`` cannot be a ``column=`` folder of this layout, or None when it can."""
    if value is not None and str(value) == NULL_PARTITION:
        return f"{column} {NULL_PARTITION!r} is reserved: readers take that folder for null"
    name = f"{column}={partition_value(value)}"
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        return (f"{column} {value!r} cannot be stored: its folder name ({column}= plus the "
                f"percent-encoded value) is {size} bytes, over the {MAX_NAME_BYTES}-byte limit "
                "of file systems")
    return None


def segment(column: str, value: Any) -> str:
    """One hive folder name, ``column=<encoded value>``."""
    return f"{column}={partition_value(value)}"


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def table_dir(root: str, table: str) -> str:
    """The folder of one output table (``scores``, ``errors``)."""
    return f"{root.rstrip('/')}/{table}"


def partition_name(run_date: str) -> str:
    """The name of a ``run_date`` partition folder, inside its dataset's folder."""
    return segment("run_date", run_date)


def partition_path(table: str, dataset: str | None, run_date: str) -> str:
    """One dataset's ``run_date`` partition of ``table``, relative to the output root."""
    return f"{table}/{segment('dataset', dataset)}/{partition_name(run_date)}"


def partition_dir(root: str, table: str, dataset: str | None, run_date: str) -> str:
    """The folder of one dataset's ``run_date`` partition of ``table``."""
    return f"{root.rstrip('/')}/{partition_path(table, dataset, run_date)}"


def summary_path(run_date: str) -> str:
    """:func:`summary_dir`, relative to the output root."""
    return f"{SUMMARY}/{partition_name(run_date)}"


def summary_dir(root: str, run_date: str) -> str:
    """The folder of a date's published summary (and drift, nightly) files."""
    return f"{root.rstrip('/')}/{summary_path(run_date)}"


def staging_path(run_date: str, key: str) -> str:
    """:func:`staging_root`, relative to the output root."""
    return f"{STAGING_DIR}/{partition_name(run_date)}/{partition_value(key)}"


def run_cache_path(run_date: str, key: str) -> str:
    """A run's own feature cache, beside its staging folder, relative to the output root."""
    return f"{staging_path(run_date, key)}.features"


def staging_root(root: str, run_date: str, key: str) -> str:
    """Where the run of key ``key`` writes its files before they are committed."""
    return f"{root.rstrip('/')}/{staging_path(run_date, key)}"


def commits_dir(root: str, run_date: str) -> str:
    """The folder of a date's commit records."""
    return f"{root.rstrip('/')}/{COMMITS_DIR}/{partition_name(run_date)}"


def record_name(version: int) -> str:
    """The file name of a commit record: zero-padded, so names sort as versions do."""
    return f"{version:010d}.json"


def reports_path(run_date: str, commit_id: str) -> str:
    """Where one commit keeps the report files its record names, relative to the root."""
    return f"{REPORTS_DIR}/{partition_name(run_date)}/{commit_id}"


def run_folder(table: str, run_date: str, key: str) -> str:
    """Everything one run writes in place for ``table`` (maps) on ``run_date``, relative to
    the output root: one folder, so that a dead run's files are found without a listing."""
    return f"{table}/{partition_name(run_date)}/run={key}"


def folder_prefix(table: str, run_date: str, key: str, dataset: str | None) -> str:
    """One dataset's folder of a run's in-place table (a maps partition), relative to the
    root; each bundle attempt writes into its own sub-folder."""
    return f"{run_folder(table, run_date, key)}/{segment('dataset', dataset)}"


def run_entry_path(root: str, key: str) -> str:
    """A run's registration file (``pipeline.core.runs``)."""
    return f"{root.rstrip('/')}/{RUNS_DIR}/{key}.json"


def locks_dir(root: str, run_date: str) -> str:
    """The folder of a date's lock files."""
    return f"{root.rstrip('/')}/{LOCKS_DIR}/{partition_name(run_date)}"


def feature_cache_dir(root: str) -> str:
    """The default feature cache of jobs that keep one beside their outputs."""
    return f"{root.rstrip('/')}/{FEATURE_CACHE_DIR}"


def output_fs(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of an output root and the root as that file system's path."""
    fs, root = fsspec.core.url_to_fs(output)
    return fs, root.rstrip("/")


def to_url(output: str, relative: str) -> str:
    """A path relative to the output root (as records hold them) as a URL like ``output``."""
    return f"{output.rstrip('/')}/{relative}"


# --------------------------------------------------------------------------------------------
# Commit records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """One dataset's files of a partitioned table, or one report's files (dataset None).

    ``prefix`` (folder tables, maps): the folder the partition names as a whole; its files
    in force are those of the bundle attempts its attempts file (in ``files``) lists.
    """

    dataset: str | None
    run_id: str
    files: tuple[str, ...]  # relative to the output root
    prefix: str | None = None

    def to_json(self) -> dict:
        out = {"dataset": self.dataset, "run_id": self.run_id, "files": list(self.files)}
        if self.prefix is not None:
            out["prefix"] = self.prefix
        return out

    @staticmethod
    def from_json(obj: Mapping) -> "Partition":
        return Partition(obj["dataset"], obj["run_id"], tuple(obj["files"]), obj.get("prefix"))

    def names(self, path: str) -> bool:
        """Whether ``path`` (relative to the root) is one of this partition's files or lies
        in its folder."""
        return path in self.files or (self.prefix is not None
                                      and path.startswith(self.prefix.rstrip("/") + "/"))


@dataclass(frozen=True)
class Kept:
    """A partition a record took over from the record before it, and why: what a run keeps
    of an earlier run is kept on purpose and said so."""

    table: str
    dataset: str | None
    run_id: str
    reason: str

    def to_json(self) -> dict:
        return {"table": self.table, "dataset": self.dataset, "run_id": self.run_id,
                "reason": self.reason}

    @staticmethod
    def from_json(obj: Mapping) -> "Kept":
        return Kept(obj["table"], obj["dataset"], obj["run_id"], obj["reason"])


@dataclass(frozen=True)
class Record:
    """A date's tables in force after one commit (``version``) of run ``run_id``.

    ``commit_id`` is the run's key, which every data file of the run carries. ``kept``
    lists the partitions taken over from the record before (other datasets', or rows a
    nightly run carried), each with its reason; everything else is this run's.
    """

    run_date: str
    version: int
    run_id: str
    commit_id: str
    committed_at: str
    tables: Mapping[str, tuple[Partition, ...]] = field(default_factory=dict)
    #: The tables partitioned by dataset (the others are per-date reports).
    partitioned: frozenset[str] = frozenset(PARTITIONED_TABLES)
    kept: tuple[Kept, ...] = ()

    def partitions(self, table: str) -> tuple[Partition, ...]:
        return tuple(self.tables.get(table, ()))

    def files(self, table: str) -> list[tuple[str | None, str]]:
        """``(dataset, relative path)`` of every file of ``table`` the record lists (for a
        folder partition: its attempts file; :func:`current_files` lists the folder)."""
        return [(p.dataset, f) for p in self.partitions(table) for f in p.files]

    def all_files(self) -> set[str]:
        return {f for parts in self.tables.values() for p in parts for f in p.files}

    def all_prefixes(self) -> set[str]:
        return {p.prefix for parts in self.tables.values() for p in parts
                if p.prefix is not None}

    def names(self, path: str) -> bool:
        """Whether ``path`` (relative to the root) is a file in force under this record."""
        return any(p.names(path) for parts in self.tables.values() for p in parts)

    def to_json(self) -> dict:
        out = {"format": RECORD_FORMAT, "run_date": self.run_date, "version": self.version,
               "run_id": self.run_id, "commit_id": self.commit_id,
               "committed_at": self.committed_at,
               "tables": {t: {"partitioned": t in self.partitioned,
                              "partitions": [p.to_json() for p in parts]}
                          for t, parts in sorted(self.tables.items())}}
        out["kept"] = [k.to_json() for k in self.kept]
        return out

    @staticmethod
    def from_json(obj: Mapping) -> "Record":
        if obj.get("format") not in READABLE_FORMATS:
            raise ValueError(f"not a commit record of format {RECORD_FORMAT}: "
                             f"{obj.get('format')!r}")
        tables = obj["tables"]
        return Record(obj["run_date"], int(obj["version"]), obj["run_id"], obj["commit_id"],
                      obj["committed_at"],
                      {t: tuple(Partition.from_json(p) for p in v["partitions"])
                       for t, v in tables.items()},
                      frozenset(PARTITIONED_TABLES) | {t for t, v in tables.items()
                                                      if v["partitioned"]},
                      tuple(Kept.from_json(k) for k in obj.get("kept", ())))


def _names(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The entry names of ``folder`` (none when it does not exist), listed afresh."""
    fs.invalidate_cache(folder)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []


def record_versions(output: str, run_date: str) -> list[int]:
    """The versions of a date's commit records, oldest first."""
    fs, _ = output_fs(output)
    folder = output_fs(commits_dir(output, run_date))[1]
    return sorted(int(n[:-5]) for n in _names(fs, folder)
                  if n.endswith(".json") and n[:-5].isdigit())


def read_record(output: str, run_date: str, version: int) -> Record:
    """One commit record of a date."""
    fs, path = output_fs(f"{commits_dir(output, run_date)}/{record_name(version)}")
    with fs.open(path, "rb") as f:
        return Record.from_json(json.load(f))


def current_record(output: str, run_date: str,
                   versions: Sequence[int] | None = None) -> Record | None:
    """The record in force for ``run_date``: the highest readable version (of ``versions``,
    when the caller has just listed them), or None."""
    if versions is None:
        versions = record_versions(output, run_date)
    for version in reversed(versions):
        try:
            return read_record(output, run_date, version)
        except (ValueError, KeyError) as exc:
            # Exclusive creation makes a record whole or absent; an unreadable one can only
            # come from a file system without it and is skipped like an aborted commit.
            LOG.warning("Commit record %d of %s is unreadable (%s); using the one before",
                        version, run_date, exc)
    return None


def record_in_force(output: str, run_date: str) -> tuple[int, Record | None]:
    """The date's newest record version (0 when it has none) and the record in force: what
    a run starts from, and what its commit checks it still is."""
    versions = record_versions(output, run_date)
    return (versions[-1] if versions else 0), current_record(output, run_date, versions)


def record_dates(output: str) -> list[str]:
    """Dates with commit records, oldest first."""
    fs, root = output_fs(output)
    dates = []
    for name in _names(fs, f"{root}/{COMMITS_DIR}"):
        column, _, value = name.partition("=")
        if column == "run_date" and value:
            dates.append(decode_value(value))
    return sorted(d for d in dates if d)


# --------------------------------------------------------------------------------------------
# Reading the current result back
# --------------------------------------------------------------------------------------------


def _arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _dataset_is(value: str | None) -> pc.Expression:
    field_ = pc.field("dataset")
    return field_.is_null() if value is None else field_ == pa.scalar(value, pa.string())


def read_files(output: str, files: Sequence[tuple[str | None, str]],
               columns: Sequence[str] | None = None) -> pa.Table | None:
    """Rows of ``(dataset, path)`` Parquet files (paths relative to ``output``, as records
    hold them) plus a string ``dataset`` column, or None when there is no file.

    Files whose columns differ (written by different runs) are read with their schemas
    unified; a column a file lacks reads as null, and so does an asked column none has.
    """
    if not files:
        return None
    fs, root = output_fs(output)
    arrow_fs, fmt = _arrow_fs(fs), pads.ParquetFileFormat()
    parts = [fmt.make_fragment(f"{root}/{path}", filesystem=arrow_fs,
                               partition_expression=_dataset_is(dataset))
             for dataset, path in files]
    schema = pa.unify_schemas([f.physical_schema for f in parts]
                              + [pa.schema([PARTITION_SCHEMA.field("dataset")])],
                              promote_options="permissive")
    data = pads.FileSystemDataset(parts, schema, fmt, filesystem=arrow_fs)
    if columns is None:
        columns = [n for n in schema.names if n not in PARTITION_COLUMNS]
    wanted = [c for c in columns if c != "dataset"] + ["dataset"]
    table = data.to_table(columns=[c for c in wanted if c in schema.names])
    for name in (c for c in wanted if c not in schema.names):
        table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(wanted)


def _parquet(files: Iterable[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    return [(d, f) for d, f in files if f.endswith(".parquet")]


#: Attempts a reader makes when commits keep replacing the files it is reading.
READ_ATTEMPTS = 5


def read_partition(output: str, date: str, table: str = SCORES,
                   columns: Sequence[str] | None = None) -> pa.Table | None:
    """Every dataset's ``date`` rows of ``table`` in force (all columns, or ``columns``) plus
    a string ``dataset`` column, or None when the date has no data file of ``table``.

    A commit that lands during the read deletes the files it superseded; the read then
    starts again from the new record."""
    for attempt in range(READ_ATTEMPTS):
        record = current_record(output, date)
        if record is None:
            return None
        try:
            return read_files(output, _parquet(record.files(table)), columns)
        except FileNotFoundError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            LOG.info("The %s record of %s changed while it was read; reading it again",
                     table, date)
    raise AssertionError("unreachable")


def read_current(output: str, table: str, date: str | None = None) -> pa.Table:
    """The rows of partitioned ``table`` (scores, errors) in force (of ``date``, or of every
    date) as one pyarrow Table: every column any file has (schemas unified: a column a file
    lacks reads as null), then the string partition columns ``dataset`` and ``run_date``.

    The consistent read to use from Python: each date's files are read as its record in
    force names them, and a commit that lands meanwhile (deleting superseded files) makes
    that date be read again from the new record."""
    if table in FOLDER_TABLES:
        raise ValueError(f"{table!r} holds image files, not rows: list them with "
                         "current_files()")
    pieces = []
    for day in ([date] if date is not None else record_dates(output)):
        rows = read_partition(output, day, table)
        if rows is not None:
            pieces.append(rows.append_column("run_date", pa.array([day] * rows.num_rows,
                                                                 pa.string())))
    if not pieces:
        return PARTITION_SCHEMA.empty_table()
    return pa.concat_tables(pieces, promote_options="permissive")


def folder_files(output: str, partition: Partition) -> list[str]:
    """The files (relative to the root) of a folder partition (maps): those in the
    sub-folders of the attempts its attempts file lists."""
    fs, root = output_fs(output)
    attempts: list[str] = []
    for rel in partition.files:
        if posixpath.basename(rel) == ATTEMPTS_FILE:
            with fs.open(f"{root}/{rel}", "rb") as f:
                attempts.extend(json.load(f)["attempts"])
    found = []
    for attempt in sorted(attempts):
        folder = f"{root}/{partition.prefix}/{attempt}"
        fs.invalidate_cache(folder)
        try:
            found.extend(sorted(p[len(root) + 1:] for p in fs.find(folder)))
        except FileNotFoundError:
            continue
    return found


class CurrentFiles(list):
    """The URLs of the files in force (a plain list of strings), with ``schema``: the one
    schema every file reads into (the files' columns unified, types promoted where runs
    differ, then the string partition columns). Give it to pyarrow and pandas: without it
    they take the columns of the first file and drop the others."""

    def __init__(self, urls: Iterable[str], output: str) -> None:
        super().__init__(urls)
        self._output = output
        self._schema: pa.Schema | None = None

    @property
    def schema(self) -> pa.Schema:
        if self._schema is None:
            self._schema = unified_schema(self._output, [u for u in self
                                                         if u.endswith(".parquet")])
        return self._schema


def unified_schema(output: str, urls: Sequence[str]) -> pa.Schema:
    """The schema Parquet files ``urls`` (under ``output``) read into together: their
    columns unified (``permissive`` promotion) plus ``dataset`` and ``run_date`` as
    strings, metadata dropped."""
    fs, _ = output_fs(output)
    arrow_fs, fmt = _arrow_fs(fs), pads.ParquetFileFormat()
    schemas = [fmt.make_fragment(output_fs(u)[1], filesystem=arrow_fs).physical_schema
               for u in urls]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    schema = pa.schema([f for f in schema if f.name not in PARTITION_COLUMNS])
    return pa.schema(list(schema) + list(PARTITION_SCHEMA)).remove_metadata()


def current_files(output: str, table: str, run_date: str | None = None) -> CurrentFiles:
    """URLs of the files of ``table`` in force (of ``run_date``, or of every date): what a
    reader wanting one consistent view passes to pyarrow, pandas or DuckDB, with their
    unified ``schema`` (:class:`CurrentFiles`). For maps: every map and overlay file in
    force. A commit after this call may delete some of them: :func:`read_current` reads
    again then."""
    out = []
    for date in ([run_date] if run_date is not None else record_dates(output)):
        record = current_record(output, date)
        if record is None:
            continue
        for p in record.partitions(table):
            files = folder_files(output, p) if p.prefix is not None else p.files
            out.extend(to_url(output, f) for f in files)
    return CurrentFiles(out, output)


def _has(output: str, date: str, table: str) -> bool:
    record = current_record(output, date)
    return record is not None and bool(record.partitions(table))


def committed_dates(output: str, table: str = SCORES) -> list[str]:
    """Dates with at least one partition of ``table`` in force, oldest first."""
    return [d for d in record_dates(output) if _has(output, d, table)]


def previous_date(output: str, date: str) -> str | None:
    """The latest date before ``date`` with scores in force: the 'previous night' for drift."""
    # Newest first: usually the night before decides, after one record read.
    return next((d for d in reversed(record_dates(output)) if d < date
                 and _has(output, d, SCORES)), None)

