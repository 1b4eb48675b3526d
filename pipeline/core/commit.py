"""Committing one run's tables for one date: immutable files, then one commit record.

A run writes every file aside (``OUT/_staging/run_date=<d>/<run>/``) and lists them in a
:class:`Staged`. :func:`commit_run` then

1. checks that the date's record is still the one the run started from (``base_version``)
   and that the run still holds the date's lock (:class:`pipeline.core.locks.LockToken`);
2. moves each staged file to its final, unique name, one file at a time (a rename on local
   disks, copy + delete on object stores; no folder is ever moved): part files into their
   hive partitions, report files (summary, drift, nightly) into
   ``OUT/_reports/run_date=<d>/<commit>/``;
3. checks the lock again and creates record ``base + 1`` exclusively. This single file is
   the switch: it lists every table's files in force, this run's datasets replaced, the
   other datasets' files kept from the record before. Until it exists the previous record
   is in force, whole; after it, this run's tables are, all of them;
4. publishes: ``_SUCCESS`` markers, copies of the report files into ``summary/run_date=<d>/``,
   deletion of the files it superseded, pruning of old records, removal of the staging.

A run dead anywhere in 2-4 is tidied by the next run of the date (:func:`recover_date`, under
the lock): files that no record names are deleted and step 4 is redone. A run that finds its
base gone (another run committed meanwhile) raises :class:`CommitConflict` and removes what it
moved. :func:`date_lease` holds the lock, recovers and gives the run its :class:`CommitPlan`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.layout import (COMMITS_DIR, LEGACY_RUN, PARTITIONED_TABLES, REPORTS_DIR,
                                  STAGING_DIR, SUCCESS_MARKER, Partition, Record, aside_glob,
                                  commits_dir, current_record, is_retired, legacy_dates,
                                  legacy_record, migrated_marker, output_fs, partition_glob,
                                  partition_name, partition_path, partition_value, read_record,
                                  record_name, record_versions, reports_path, staging_path,
                                  summary_path)
from pipeline.core.locks import (DEFAULT_TTL_S, DateLock, LockLost, LockToken, copy_file,
                                 create_exclusive, is_local, move_file, replace_file)
from pipeline.core.schemas import ERRORS, SCORES

LOG = logging.getLogger(__name__)

#: Records kept per date after a commit (older ones are only history).
KEEP_RECORDS = 20
STAGED_MANIFEST = "staged.json"


class CommitConflict(RuntimeError):
    """Another run committed the date after this run started: this run's result is dropped."""


def _progress(step: str, **info) -> None:
    """A commit reached ``step``: logged, and the seam tests use to stop a commit there."""
    LOG.debug("commit step %s %s", step, info)


# --------------------------------------------------------------------------------------------
# What a run staged, and where it commits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staged:
    """The files one run wrote aside for one date (paths relative to the output root).

    ``parts`` are ``(table, dataset, path)`` of partitioned tables, ``reports`` ``(table,
    path)`` of per-date reports. ``datasets`` are the datasets the run answers for: their
    partitions of every partitioned table the run writes are replaced, even by none.
    """

    parts: tuple[tuple[str, str | None, str], ...] = ()
    reports: tuple[tuple[str, str], ...] = ()
    datasets: tuple[str | None, ...] = ()

    def owned(self) -> set[str | None]:
        return set(self.datasets) | {d for _, d, _ in self.parts}

    def __add__(self, other: "Staged") -> "Staged":
        return Staged(self.parts + other.parts, self.reports + other.reports,
                      tuple(dict.fromkeys(self.datasets + other.datasets)))

    def to_json(self) -> dict:
        return {"parts": [list(p) for p in self.parts], "reports": [list(r) for r in self.reports],
                "datasets": list(self.datasets)}

    @staticmethod
    def from_json(obj: Mapping) -> "Staged":
        return Staged(tuple(tuple(p) for p in obj["parts"]),
                      tuple(tuple(r) for r in obj["reports"]), tuple(obj["datasets"]))


@dataclass(frozen=True)
class CommitPlan:
    """Where and how one run commits one date; small and picklable (it travels to workers).

    ``base_version`` is the record the run started from (None: whatever is current when it
    commits), ``fence`` the lock the run holds (None: no lock check), ``commit_id`` names
    this commit's files and lets a retried commit recognise its own record.
    """

    output: str
    run_date: str
    run_id: str
    base_version: int | None = None
    fence: LockToken | None = None
    commit_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def staging(self) -> str:
        """The run's staging folder, relative to the output root."""
        return staging_path(self.run_date, self.run_id)

    def staging_url(self, *parts: str) -> str:
        return "/".join([self.output.rstrip("/"), self.staging, *parts])


def relative(output: str, url: str) -> str:
    """``url`` (under the output root, spelled as ``output`` is) relative to the root."""
    prefix = output.rstrip("/") + "/"
    if not url.startswith(prefix):
        raise ValueError(f"{url} is not under the output root {output}")
    return url[len(prefix):]


def _abs(root: str, rel: str) -> str:
    return f"{root}/{rel}"


def stage_empty(plan: CommitPlan, staged: Staged, schemas: Mapping[str, pa.Schema]) -> Staged:
    """``staged`` plus one empty file of ``schemas[table]`` for each dataset the run owns but
    wrote no row of in ``table``, so that readers still see the table's columns."""
    fs, root = output_fs(plan.output)
    owned = staged.owned() - {None}  # rows without a dataset are only ever errors
    extra = []
    for table, schema in schemas.items():
        have = {d for t, d, _ in staged.parts if t == table}
        for dataset in sorted(owned - have, key=_dataset_key):
            # Named by commit and dataset: a retried commit step writes the same names.
            key = hashlib.sha1(f"{plan.commit_id}/{table}/{dataset}".encode()).hexdigest()
            rel = f"{plan.staging}/{table}/part-{key[:32]}-empty.parquet"
            fs.makedirs(posixpath.dirname(_abs(root, rel)), exist_ok=True)
            with fs.open(_abs(root, rel), "wb") as f:
                pq.write_table(schema.empty_table(), f)
            extra.append((table, dataset, rel))
    return replace(staged, parts=staged.parts + tuple(extra))


def write_staged(plan: CommitPlan, staged: Staged) -> str:
    """Save ``staged`` in the run's staging folder (for a caller that commits later)."""
    fs, root = output_fs(plan.output)
    path = _abs(root, f"{plan.staging}/{STAGED_MANIFEST}")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    replace_file(fs, path, json.dumps(staged.to_json()).encode())
    return path


def read_staged(plan: CommitPlan) -> Staged:
    """What :func:`write_staged` saved for this run (nothing staged: an empty Staged)."""
    fs, root = output_fs(plan.output)
    try:
        with fs.open(_abs(root, f"{plan.staging}/{STAGED_MANIFEST}"), "rb") as f:
            return Staged.from_json(json.load(f))
    except FileNotFoundError:
        return Staged()


# --------------------------------------------------------------------------------------------
# The commit
# --------------------------------------------------------------------------------------------


def _dataset_key(dataset: str | None) -> tuple:
    return (dataset is not None, dataset or "")


def _legacy_value(dataset: str | None) -> str:
    """The folder value the former layout gave a dataset (lossy: kept only to migrate)."""
    if dataset is None or dataset == "":
        return "_unknown"
    text = str(dataset)
    for ch in '/\\=:*?"<>|\n':
        text = text.replace(ch, "_")
    return text


def _supersedes(owned: set, partition: Partition) -> bool:
    """Whether a partition of the record before is replaced by a run owning ``owned``."""
    if partition.dataset in owned:
        return True
    # A partition adopted from the former layout holds every dataset its folder name merged.
    return partition.run_id == LEGACY_RUN and partition.dataset in {
        _legacy_value(d) for d in owned}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def next_record(previous: Record | None, staged: Staged, plan: CommitPlan, version: int, *,
                final: bool = True) -> tuple[Record, list[tuple[str, str]]]:
    """The record ``staged`` makes of ``previous``, and the ``(staged, final)`` moves it
    takes. With ``final=False`` the record names the staged files themselves (a preview of
    the commit, read before it happens)."""
    date = plan.run_date
    moves = []

    def place(src: str, folder: str) -> str:
        if not final:
            return src
        dst = f"{folder}/{posixpath.basename(src)}"
        moves.append((src, dst))
        return dst

    tables = dict(previous.tables) if previous is not None else {}
    partitioned = (previous.partitioned if previous is not None else frozenset(
        PARTITIONED_TABLES)) | {t for t, _, _ in staged.parts}
    owned = staged.owned()
    for table in sorted({t for t, _, _ in staged.parts}):
        by_dataset: dict[str | None, list[str]] = {}
        for t, dataset, path in staged.parts:
            if t == table:
                by_dataset.setdefault(dataset, []).append(
                    place(path, partition_path(table, dataset, date)))
        kept = [p for p in tables.get(table, ()) if not _supersedes(owned, p)]
        new = [Partition(d, plan.run_id, tuple(sorted(f))) for d, f in by_dataset.items()]
        tables[table] = tuple(sorted(kept + new, key=lambda p: _dataset_key(p.dataset)))
    for table in sorted({t for t, _ in staged.reports}):
        files = [place(path, reports_path(date, plan.commit_id))
                 for t, path in staged.reports if t == table]
        tables[table] = (Partition(None, plan.run_id, tuple(sorted(files))),)
    return Record(date, version, plan.run_id, plan.commit_id, _now(), tables,
                  frozenset(partitioned)), moves


def preview(plan: CommitPlan, staged: Staged, table: str) -> list[tuple[str | None, str]]:
    """``(dataset, path)`` of the files of ``table`` that committing ``staged`` would put in
    force, read before the commit (this run's files still in staging)."""
    record, _ = next_record(current_record(plan.output, plan.run_date), staged, plan, 0,
                            final=False)
    return record.files(table)


def _record_path(output: str, run_date: str, version: int) -> str:
    return output_fs(f"{commits_dir(output, run_date)}/{record_name(version)}")[1]


def adopt_legacy(output: str, run_date: str) -> tuple[int, Record | None]:
    """The date's newest record version and the record in force. A date written before
    commit records existed gets its ``_SUCCESS`` partitions recorded as version 1 first, so
    that every later change is a record change."""
    versions = record_versions(output, run_date)
    if versions:
        return versions[-1], current_record(output, run_date)
    legacy = legacy_record(output, run_date)
    if legacy is None:
        return 0, None
    adopted = replace(legacy, version=1, commit_id="legacy", committed_at=_now())
    fs, _ = output_fs(output)
    try:
        create_exclusive(fs, _record_path(output, run_date, 1),
                         json.dumps(adopted.to_json(), indent=1).encode())
        LOG.info("Recorded the former-layout partitions of %s as commit record 1", run_date)
    except FileExistsError:
        pass
    return adopt_legacy(output, run_date)


def adopt_all_legacy(output: str) -> None:
    """Record every former-layout date of the root (:func:`adopt_legacy`), then mark the
    root migrated, so that readers stop looking for former-layout partitions."""
    fs, marker = output_fs(migrated_marker(output))
    if fs.exists(marker):
        return
    for date in sorted(set(legacy_dates(output, SCORES)) | set(legacy_dates(output, ERRORS))):
        adopt_legacy(output, date)
    fs.makedirs(marker.rpartition("/")[0], exist_ok=True)
    replace_file(fs, marker, b"Every partition of this output root is named by a record.\n")


def _undo(fs: fsspec.AbstractFileSystem, root: str, moves: Iterable[tuple[str, str]]) -> None:
    for _, dst in moves:
        try:
            fs.rm_file(_abs(root, dst))
        except FileNotFoundError:
            pass


def commit_run(plan: CommitPlan, staged: Staged) -> Record:
    """Put ``staged`` in force for ``plan.run_date`` with one new record (module docstring).

    Safe to call again after a failure: files already moved are not moved twice, and a
    commit whose record was written is only published again.
    """
    fs, root = output_fs(plan.output)
    _progress("started", run_id=plan.run_id)
    top, previous = adopt_legacy(plan.output, plan.run_date)
    if previous is not None and previous.commit_id == plan.commit_id:
        LOG.info("Commit %s of %s was already recorded; publishing it", plan.commit_id,
                 plan.run_date)
        publish(plan.output, previous, _record_before(plan.output, previous))
        remove_staging(plan.output, plan.run_date, plan.run_id)
        return previous
    if plan.base_version is not None and top != plan.base_version:
        raise CommitConflict(
            f"Run {plan.run_id} started from commit record {plan.base_version} of "
            f"{plan.run_date} in {plan.output}, but record {top} is now in force: another run "
            "committed the date meanwhile. This run's files are not committed.")
    if plan.fence is not None:
        plan.fence.check()
    record, moves = next_record(previous, staged, plan, top + 1)
    for n, (src, dst) in enumerate(moves, 1):
        source, target = _abs(root, src), _abs(root, dst)
        if not fs.exists(source) and fs.exists(target):
            continue  # moved by an earlier attempt of this commit
        move_file(fs, source, target)
        _progress("moved", n=n, total=len(moves), path=dst)
    try:
        if plan.fence is not None:
            plan.fence.check()
        create_exclusive(fs, _record_path(plan.output, plan.run_date, record.version),
                         json.dumps(record.to_json(), indent=1).encode())
    except FileExistsError:
        winner = read_record(plan.output, plan.run_date, record.version)
        if winner.commit_id != plan.commit_id:
            _undo(fs, root, moves)
            raise CommitConflict(
                f"Run {winner.run_id} committed record {record.version} of {plan.run_date} "
                f"in {plan.output} first; run {plan.run_id}'s files are not committed.")
    except LockLost:
        _undo(fs, root, moves)
        raise
    _progress("recorded", version=record.version)
    LOG.info("Committed %s of %s as record %d (run %s, %d files moved)", plan.run_date,
             plan.output, record.version, plan.run_id, len(moves))
    publish(plan.output, record, previous)
    remove_staging(plan.output, plan.run_date, plan.run_id)
    return record


def _record_before(output: str, record: Record) -> Record | None:
    if record.version <= 1:
        return None
    try:
        return read_record(output, record.run_date, record.version - 1)
    except (OSError, ValueError, KeyError):
        return None


def _rm(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        fs.rm_file(path)
        return True
    except FileNotFoundError:
        return False


def _rmdir_empty(fs: fsspec.AbstractFileSystem, folder: str, root: str) -> None:
    """Remove ``folder`` and its empty parents below ``root`` (local disks; object stores
    have no folders)."""
    if not is_local(fs):
        return
    while folder.startswith(root + "/"):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = posixpath.dirname(folder)


def publish(output: str, record: Record, previous: Record | None) -> None:
    """What follows a record (step 4): markers and summary copies for what it changed, then
    deletion of what it superseded and of old records. Redone by recovery; idempotent."""
    fs, root = output_fs(output)
    date = record.run_date
    partitioned = record.partitioned | (previous.partitioned if previous else frozenset())
    for table in sorted(record.partitioned):
        before = set(previous.partitions(table)) if previous is not None else set()
        for p in record.partitions(table):
            if p not in before:
                folder = (posixpath.dirname(p.files[0]) if p.files
                          else partition_path(table, p.dataset, date))
                replace_file(fs, _abs(root, f"{folder}/{SUCCESS_MARKER}"),
                             f"{p.run_id}\n".encode())
    _progress("marked")
    published = _abs(root, summary_path(date))
    for table, parts in sorted(record.tables.items()):
        if table in partitioned:
            continue
        if previous is not None and previous.partitions(table) == parts:
            continue
        for p in parts:
            for f in p.files:
                copy_file(fs, _abs(root, f), f"{published}/{posixpath.basename(f)}")
    for table, parts in (previous.tables.items() if previous is not None else ()):
        if table not in partitioned and table not in record.tables:
            for p in parts:
                for f in p.files:
                    _rm(fs, f"{published}/{posixpath.basename(f)}")
    _progress("copied")
    if previous is not None:
        keep = record.all_files()
        folders_now = {posixpath.dirname(f) for t in record.partitioned
                       for _, f in record.files(t)}
        gone = sorted(previous.all_files() - keep)
        for n, rel in enumerate(gone, 1):
            _rm(fs, _abs(root, rel))
            _progress("deleted", n=n, total=len(gone), path=rel)
        for folder in sorted({posixpath.dirname(f) for f in gone}):
            if folder not in folders_now:
                _rm(fs, _abs(root, f"{folder}/{SUCCESS_MARKER}"))
                _rmdir_empty(fs, _abs(root, folder), root)
    for version in record_versions(output, date):
        if version < record.version - KEEP_RECORDS + 1:
            _rm(fs, _record_path(output, date, version))
    _progress("published")


# --------------------------------------------------------------------------------------------
# Recovery, staging, the lease
# --------------------------------------------------------------------------------------------


def _ls(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    fs.invalidate_cache(folder)
    try:
        return sorted(p.rstrip("/") for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []


def remove_staging(output: str, run_date: str, run_id: str) -> None:
    """A run's staging folder, and the staging folders above it once empty."""
    fs, root = output_fs(output)
    folder = _abs(root, staging_path(run_date, run_id))
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    _rmdir_empty(fs, posixpath.dirname(folder), root)


def restore_legacy_swaps(output: str, table: str, run_date: str) -> list[str]:
    """Tidy the ``run_date`` partitions of ``table`` after a former-layout commit (folder
    swap) died: a partition retired but not replaced is put back; hidden folders it left
    beside partitions are removed. Returns the partitions restored."""
    # A glob: url_to_fs leaves it unexpanded (get_fs_token_paths would expand it).
    fs, pattern = fsspec.core.url_to_fs(aside_glob(partition_glob(output, table, run_date)))
    by_dataset: dict[str, list[str]] = {}
    for path in sorted(fs.glob(pattern)):
        by_dataset.setdefault(path.rstrip("/").rpartition("/")[0], []).append(path)
    restored = []
    for dataset_dir, leftovers in sorted(by_dataset.items()):
        final = f"{dataset_dir}/{partition_name(run_date)}"
        retired = [p for p in leftovers if is_retired(p)]
        if retired and not fs.exists(final):
            fs.mv(retired[-1], final, recursive=True)
            restored.append(final)
            LOG.warning("Restored %s, retired by a commit that did not finish", final)
        for path in leftovers:
            if fs.exists(path):
                fs.rm(path, recursive=True)
    return restored


def recover_date(output: str, run_date: str, *, keep_run: str | None = None) -> list[str]:
    """Tidy ``run_date`` after runs that died: delete partition and report files that the
    record in force does not name, other runs' staging folders (but ``keep_run``'s), and
    redo the record's publication. Call it only while holding the date's lock. Returns the
    paths removed (relative to the output root)."""
    fs, root = output_fs(output)
    removed: list[str] = []
    for table in PARTITIONED_TABLES:
        restore_legacy_swaps(output, table, run_date)
    record = current_record(output, run_date)
    if record is None or record.version > 0:
        keep = record.all_files() if record is not None else set()
        partitioned = record.partitioned if record is not None else PARTITIONED_TABLES
        for table in sorted(partitioned):
            for dataset_dir in _ls(fs, _abs(root, table)):
                if not posixpath.basename(dataset_dir).startswith("dataset="):
                    continue
                for path in _ls(fs, f"{dataset_dir}/{partition_name(run_date)}"):
                    rel = path[len(root) + 1:]
                    if posixpath.basename(path) != SUCCESS_MARKER and rel not in keep:
                        if _rm(fs, path):
                            removed.append(rel)
        kept_reports = {posixpath.dirname(f) for t, parts in (record.tables.items()
                                                               if record else ())
                        if t not in partitioned for p in parts for f in p.files}
        for folder in _ls(fs, _abs(root, f"{REPORTS_DIR}/{partition_name(run_date)}")):
            rel = folder[len(root) + 1:]
            if rel not in kept_reports:
                fs.rm(folder, recursive=True)
                removed.append(rel)
        if record is not None:
            publish(output, record, _record_before(output, record))
    staging = _abs(root, f"{STAGING_DIR}/{partition_name(run_date)}")
    for folder in _ls(fs, staging):
        if keep_run is None or posixpath.basename(folder) != partition_value(keep_run):
            fs.rm(folder, recursive=True)
            removed.append(folder[len(root) + 1:])
    _rmdir_empty(fs, staging, root)
    if removed:
        LOG.warning("Recovered %s of %s after a run that did not finish: removed %d "
                    "uncommitted files or folders", run_date, output, len(removed))
    return removed


@contextmanager
def date_lease(output: str, run_date: str, run_id: str, *, wait_s: float = 0.0,
               ttl_s: float = DEFAULT_TTL_S) -> Iterator[CommitPlan]:
    """Hold the date's lock for a run: recover what dead runs left, then yield the run's
    :class:`CommitPlan` (based on the record now in force, fenced by the lock). Leaving
    removes the run's staging folder and releases the lock."""
    lock = DateLock(output, run_date, run_id, wait_s=wait_s, ttl_s=ttl_s)
    token = lock.acquire()
    try:
        adopt_all_legacy(output)
        recover_date(output, run_date)
        top, _ = adopt_legacy(output, run_date)
        yield CommitPlan(output, run_date, run_id, base_version=top, fence=token)
    finally:
        try:
            remove_staging(output, run_date, run_id)
        finally:
            lock.release()


__all__ = ["COMMITS_DIR", "CommitConflict", "CommitPlan", "KEEP_RECORDS", "Staged",
           "adopt_all_legacy", "adopt_legacy", "commit_run", "date_lease", "next_record",
           "preview", "publish", "read_staged", "recover_date", "relative", "remove_staging",
           "restore_legacy_swaps", "stage_empty", "write_staged"]
