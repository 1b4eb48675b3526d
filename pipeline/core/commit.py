"""Committing one run's tables for one date: immutable files, then one commit record.

The invariant: **a data file (a table's Parquet file or an anomaly map), once written, is
never written again or moved onto, and never deleted while the record in force names it;
the record is the only switch.** A data file no record in force names is either superseded
(deleted by the commit that superseded it) or garbage of a dead run, collected by a later
run (:mod:`pipeline.core.vacuum`).

Every run has a unique key (:attr:`CommitPlan.commit_id`) that its files carry. It writes its
part files aside (``OUT/_staging/run_date=<d>/<key>/``), its anomaly maps in place under a
folder of its own (``OUT/maps/run_date=<d>/run=<key>/dataset=<ds>/<attempt>/``, one
sub-folder per bundle attempt), and lists them in a :class:`Staged`. :func:`commit_run` then

1. checks that the date's record is still the one the run started from (``base_version``)
   and that the run still holds the date's lock (:class:`pipeline.core.locks.LockToken`);
2. notes in the run's registration every name it will move a file to
   (:mod:`pipeline.core.runs`), writes each maps folder's attempts file (the bundle attempts
   whose maps are the run's result), and moves each staged file to its final, unique name,
   one file at a time, never onto an existing file (a hard link on local disks, copy +
   delete on object stores; no folder is ever moved): part files into their hive
   partitions, report files (summary, drift, nightly) into ``OUT/_reports/run_date=<d>/<key>/``;
3. checks the lock again and creates record ``base + 1`` exclusively. This single file is
   the switch: it lists every table's files in force (maps: one folder per run and dataset,
   named whole). What the run stands for is its own: the datasets it owns are replaced in
   every partitioned table, even by none, and only the reports it wrote are in force; what
   it keeps of an earlier run (other datasets, or a nightly run's carried rows' maps) is
   said so in the record (``kept``). Until it exists the previous record is in force,
   whole; after it, this run's tables are, all of them;
4. publishes: ``_SUCCESS`` markers, copies of the report files into ``summary/run_date=<d>/``,
   deletion of the files and folders it superseded, pruning of old records, removal of the
   staging.

A run dead anywhere is tidied by any later run (its registration says what it wrote): files
that no record in force names are deleted and step 4 is redone. A run that finds its base
gone (another run committed meanwhile) raises :class:`CommitConflict` and removes what it
moved and wrote, nothing else. :func:`pipeline.core.lease.date_lease` holds the lock,
registers the run, collects dead runs and gives the run its :class:`CommitPlan`.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.layout import (ATTEMPTS_FILE, COMMITS_DIR, FOLDER_TABLES, PARTITIONED_TABLES,
                                  REPORTS_DIR, STAGING_DIR, SUCCESS_MARKER, Kept, Partition,
                                  Record, commits_dir, current_record, folder_prefix, output_fs,
                                  partition_name, partition_path, read_record, record_in_force,
                                  record_name, reports_path, run_cache_path, run_folder,
                                  staging_path, summary_path)
from pipeline.core.locks import (LockLost, LockToken, copy_file, create_exclusive, is_local,
                                 move_file, replace_file)
from pipeline.core.runs import mark_committing, mark_published

LOG = logging.getLogger(__name__)

#: Records kept per date after a commit (older ones are only history).
KEEP_RECORDS = 20
STAGED_MANIFEST = "staged.json"
#: Why a record keeps a partition of an earlier run (``Record.kept``).
KEPT_OTHER_DATASET = "dataset not in this run"
KEPT_CARRIED = "rows carried by this run"
KEPT_UP_TO_DATE = "the scores it summarises are unchanged"


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
    """What one run wrote for one date (paths relative to the output root).

    ``parts`` are ``(table, dataset, path)`` of staged part files, ``reports`` ``(table,
    path)`` of per-date reports, ``attempts`` ``(table, dataset, attempt)`` of the bundle
    attempts that wrote a folder table's files in place (maps) and succeeded. ``datasets``
    are the datasets the run answers for: their partitions of every partitioned table are
    replaced, even by none. ``kept`` are ``(table, dataset, ref, reason)``: a partition of
    the record in force the run keeps although it owns its dataset (``ref``: one of its
    files or its folder), or a whole report table (dataset and ref None).
    """

    parts: tuple[tuple[str, str | None, str], ...] = ()
    reports: tuple[tuple[str, str], ...] = ()
    datasets: tuple[str | None, ...] = ()
    attempts: tuple[tuple[str, str | None, str], ...] = ()
    kept: tuple[tuple[str, str | None, str | None, str], ...] = ()

    def owned(self) -> set[str | None]:
        return (set(self.datasets) | {d for _, d, _ in self.parts}
                | {d for _, d, _ in self.attempts})

    def __add__(self, other: "Staged") -> "Staged":
        return Staged(self.parts + other.parts, self.reports + other.reports,
                      tuple(dict.fromkeys(self.datasets + other.datasets)),
                      self.attempts + other.attempts, self.kept + other.kept)

    def to_json(self) -> dict:
        return {"parts": [list(p) for p in self.parts], "reports": [list(r) for r in self.reports],
                "datasets": list(self.datasets), "attempts": [list(a) for a in self.attempts],
                "kept": [list(k) for k in self.kept]}

    @staticmethod
    def from_json(obj: Mapping) -> "Staged":
        return Staged(tuple(tuple(p) for p in obj["parts"]),
                      tuple(tuple(r) for r in obj["reports"]), tuple(obj["datasets"]),
                      tuple(tuple(a) for a in obj.get("attempts", ())),
                      tuple(tuple(k) for k in obj.get("kept", ())))


def new_key() -> str:
    """A run's unique key: 64 random bits, short enough for file names."""
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class CommitPlan:
    """Where and how one run commits one date; small and picklable (it travels to workers).

    ``base_version`` is the record the run started from (None: whatever is current when it
    commits), ``fence`` the lock the run holds (None: no lock check, no registration).
    ``commit_id`` is the run's key: every data file the run writes carries it, and a
    retried commit recognises its own record by it.
    """

    output: str
    run_date: str
    run_id: str
    base_version: int | None = None
    fence: LockToken | None = None
    commit_id: str = field(default_factory=new_key)

    @property
    def staging(self) -> str:
        """The run's staging folder, relative to the output root."""
        return staging_path(self.run_date, self.commit_id)

    def staging_url(self, *parts: str) -> str:
        return "/".join([self.output.rstrip("/"), self.staging, *parts])

    @property
    def feature_cache_url(self) -> str:
        """The run's own feature cache (reference features, when no --feature-cache is
        given): beside its staging folder, not in it, so that it outlives the commit (a
        runner may recompute a step after it) and goes when the run's lease ends
        (:func:`pipeline.core.vacuum.collect_run`)."""
        return f"{self.output.rstrip('/')}/{run_cache_path(self.run_date, self.commit_id)}"

    def folder(self, table: str, dataset: str | None, attempt: str) -> str:
        """Where one bundle attempt writes ``dataset``'s files of an in-place table (maps),
        relative to the output root."""
        return f"{folder_prefix(table, self.run_date, self.commit_id, dataset)}/{attempt}"


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
            digest = hashlib.sha1(f"{plan.commit_id}/{table}/{dataset}".encode()).hexdigest()
            rel = f"{plan.staging}/{table}/part-{plan.commit_id}-{digest[:16]}-empty.parquet"
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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def final_name(path: str, key: str) -> str:
    """The name a staged part file gets in its partition: it carries the run's key."""
    name = posixpath.basename(path)
    if name.startswith(f"part-{key}-"):
        return name
    return f"part-{key}-{name[5:] if name.startswith('part-') else name}"


def _keeps(staged: Staged, table: str, partition: Partition) -> str | None:
    """Why ``staged`` keeps ``partition`` of ``table`` although it owns its dataset, or
    None."""
    for t, dataset, ref, reason in staged.kept:
        if t == table and dataset == partition.dataset and ref is not None and (
                ref == partition.prefix or partition.names(ref)):
            return reason
    return None


def next_record(previous: Record | None, staged: Staged, plan: CommitPlan, version: int, *,
                final: bool = True) -> tuple[Record, list[tuple[str, str]]]:
    """The record ``staged`` makes of ``previous``, and the ``(staged, final)`` moves it
    takes. With ``final=False`` the record names the staged files themselves (a preview of
    the commit, read before it happens).

    The record holds exactly what the run stands for: in every partitioned table the owned
    datasets' partitions are this run's (none where it wrote none), other datasets'
    partitions are kept; a report table is in force only when the run wrote it, or kept it
    on purpose. Each partition taken over from ``previous`` is noted in ``kept``.
    """
    date, key = plan.run_date, plan.commit_id
    moves = []

    def place(src: str, folder: str, name: str | None = None) -> str:
        if not final:
            return src
        dst = f"{folder}/{name or posixpath.basename(src)}"
        moves.append((src, dst))
        return dst

    before = dict(previous.tables) if previous is not None else {}
    partitioned = ((previous.partitioned if previous is not None
                    else frozenset(PARTITIONED_TABLES))
                   | {t for t, _, _ in staged.parts} | {t for t, _, _ in staged.attempts})
    owned = staged.owned()
    tables: dict[str, tuple[Partition, ...]] = {}
    kept: list[Kept] = []
    for table in sorted(partitioned):
        by_dataset: dict[str | None, list[str]] = {}
        for t, dataset, path in staged.parts:
            if t == table:
                by_dataset.setdefault(dataset, []).append(
                    place(path, partition_path(table, dataset, date), final_name(path, key)))
        parts = [Partition(d, plan.run_id, tuple(sorted(f))) for d, f in by_dataset.items()]
        for dataset in dict.fromkeys(d for t, d, _ in staged.attempts if t == table):
            prefix = folder_prefix(table, date, key, dataset)
            parts.append(Partition(dataset, plan.run_id, (f"{prefix}/{ATTEMPTS_FILE}",),
                                   prefix))
        for p in before.get(table, ()):
            reason = (KEPT_OTHER_DATASET if p.dataset not in owned
                      else _keeps(staged, table, p))
            if reason is not None:
                parts.append(p)
                kept.append(Kept(table, p.dataset, p.run_id, reason))
        if parts:
            tables[table] = tuple(sorted(parts, key=lambda p: (_dataset_key(p.dataset),
                                                               p.prefix or "", p.files)))
    for table in sorted({t for t, _ in staged.reports}):
        files = [place(path, reports_path(date, key))
                 for t, path in staged.reports if t == table]
        tables[table] = (Partition(None, plan.run_id, tuple(sorted(files))),)
    for table, dataset, ref, reason in staged.kept:
        if (dataset is None and ref is None and table not in tables and table in before
                and table not in partitioned):
            tables[table] = before[table]
            kept.extend(Kept(table, None, p.run_id, reason) for p in before[table])
    return Record(date, version, plan.run_id, key, _now(), tables, frozenset(partitioned),
                  tuple(kept)), moves


def preview(plan: CommitPlan, staged: Staged, table: str) -> list[tuple[str | None, str]]:
    """``(dataset, path)`` of the files of ``table`` that committing ``staged`` would put in
    force, read before the commit (this run's files still in staging)."""
    record, _ = next_record(current_record(plan.output, plan.run_date), staged, plan, 0,
                            final=False)
    return record.files(table)


def _record_path(output: str, run_date: str, version: int) -> str:
    return output_fs(f"{commits_dir(output, run_date)}/{record_name(version)}")[1]


def _undo(fs: fsspec.AbstractFileSystem, root: str, plan: CommitPlan, staged: Staged,
          moves: Iterable[tuple[str, str]]) -> None:
    """Remove what this run's commit created (every name carries its key), nothing else:
    the files it moved and its maps folders."""
    for _, dst in moves:
        remove_file(fs, _abs(root, dst))
    for table in sorted({t for t, _, _ in staged.attempts}):
        remove_tree(fs, _abs(root, run_folder(table, plan.run_date, plan.commit_id)), root)


def _write_attempts(fs: fsspec.AbstractFileSystem, root: str, plan: CommitPlan,
                    staged: Staged) -> None:
    """Each maps folder's attempts file: the bundle attempts whose files are the run's
    result (other attempts' folders are garbage of retried bundles). Written once."""
    by_folder: dict[tuple[str, str | None], set[str]] = {}
    for table, dataset, attempt in staged.attempts:
        by_folder.setdefault((table, dataset), set()).add(attempt)
    for (table, dataset), attempts in sorted(by_folder.items(),
                                             key=lambda kv: (kv[0][0], _dataset_key(kv[0][1]))):
        prefix = folder_prefix(table, plan.run_date, plan.commit_id, dataset)
        document = {"run_id": plan.run_id, "dataset": dataset, "attempts": sorted(attempts)}
        fs.makedirs(_abs(root, prefix), exist_ok=True)
        try:
            create_exclusive(fs, _abs(root, f"{prefix}/{ATTEMPTS_FILE}"),
                             json.dumps(document).encode())
        except FileExistsError:
            pass  # written by an earlier attempt of this commit (the name carries the key)


def _winner(output: str, run_date: str, version: int) -> Record | None:
    """Record ``version``, or None when it cannot be read (another writer's conditional
    create still in progress, or failed)."""
    try:
        return read_record(output, run_date, version)
    except (OSError, ValueError, KeyError):
        return None


def commit_run(plan: CommitPlan, staged: Staged) -> Record:
    """Put ``staged`` in force for ``plan.run_date`` with one new record (module docstring).

    Safe to call again after a failure: files already moved are not moved twice, and a
    commit whose record was written is only published again.
    """
    fs, root = output_fs(plan.output)
    leased = plan.fence is not None
    _progress("started", run_id=plan.run_id)
    top, previous = record_in_force(plan.output, plan.run_date)
    if previous is not None and previous.commit_id == plan.commit_id:
        LOG.info("Commit %s of %s was already recorded; publishing it", plan.commit_id,
                 plan.run_date)
        publish(plan.output, previous, record_before(plan.output, previous))
        if leased:
            mark_published(plan.output, plan.commit_id)
        remove_staging(plan.output, plan.run_date, plan.commit_id)
        return previous
    if plan.base_version is not None and top != plan.base_version:
        raise CommitConflict(
            f"Run {plan.run_id} started from commit record {plan.base_version} of "
            f"{plan.run_date} in {plan.output}, but record {top} is now in force: another run "
            "committed the date meanwhile. This run's files are not committed.")
    if leased:
        plan.fence.check()
    record, moves = next_record(previous, staged, plan, top + 1)
    if leased:
        mark_committing(plan.output, plan.commit_id, [dst for _, dst in moves])
    _write_attempts(fs, root, plan, staged)
    _progress("attempts", n=len({(t, d) for t, d, _ in staged.attempts}))
    for n, (src, dst) in enumerate(moves, 1):
        source, target = _abs(root, src), _abs(root, dst)
        try:
            move_file(fs, source, target)
        except FileExistsError:
            remove_file(fs, source)  # an earlier attempt of this commit moved it (key in name)
        except FileNotFoundError:
            if not fs.exists(target):
                raise
        _progress("moved", n=n, total=len(moves), path=dst)
    try:
        if leased:
            plan.fence.check()
        create_exclusive(fs, _record_path(plan.output, plan.run_date, record.version),
                         json.dumps(record.to_json(), indent=1).encode())
    except FileExistsError:
        winner = _winner(plan.output, plan.run_date, record.version)
        if winner is None or winner.commit_id != plan.commit_id:
            _undo(fs, root, plan, staged, moves)
            who = (f"Run {winner.run_id} committed" if winner is not None
                   else "Another run was creating")
            raise CommitConflict(
                f"{who} record {record.version} of {plan.run_date} in {plan.output} first; "
                f"run {plan.run_id}'s files are not committed.") from None
    except LockLost:
        _undo(fs, root, plan, staged, moves)
        raise
    _progress("recorded", version=record.version)
    LOG.info("Committed %s of %s as record %d (run %s, %d files moved)", plan.run_date,
             plan.output, record.version, plan.run_id, len(moves))
    publish(plan.output, record, previous)
    if leased:
        mark_published(plan.output, plan.commit_id)
    remove_staging(plan.output, plan.run_date, plan.commit_id)
    return record


def record_before(output: str, record: Record) -> Record | None:
    if record.version <= 1:
        return None
    try:
        return read_record(output, record.run_date, record.version - 1)
    except (OSError, ValueError, KeyError):
        return None


def remove_file(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        fs.rm_file(path)
        return True
    except FileNotFoundError:
        return False


def remove_tree(fs: fsspec.AbstractFileSystem, folder: str, root: str) -> bool:
    """Remove ``folder`` and everything in it (and its empty parents below ``root``)."""
    removed = True
    if is_local(fs):
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            removed = False
    else:
        fs.invalidate_cache(folder)
        try:
            files = fs.find(folder)  # one listing; rm(recursive=True) lists more than once
        except FileNotFoundError:
            files = []
        if files:
            fs.rm(files)
        fs.invalidate_cache(folder)
        removed = bool(files)
    remove_empty_parents(fs, posixpath.dirname(folder), root)
    return removed


def remove_empty_parents(fs: fsspec.AbstractFileSystem, folder: str, root: str) -> None:
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
            if p not in before and p.prefix is None:
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
                    remove_file(fs, f"{published}/{posixpath.basename(f)}")
    _progress("copied")
    if previous is not None:
        prefixes = record.all_prefixes()
        gone_prefixes = sorted(previous.all_prefixes() - prefixes)
        gone = sorted(f for f in previous.all_files() - record.all_files()
                      if not any(f.startswith(g + "/") for g in gone_prefixes))
        folders_now = {posixpath.dirname(f) for t in record.partitioned
                       for p in record.partitions(t) if p.prefix is None for f in p.files}
        total = len(gone) + len(gone_prefixes)
        for n, rel in enumerate(gone, 1):
            remove_file(fs, _abs(root, rel))
            _progress("deleted", n=n, total=total, path=rel)
        for n, prefix in enumerate(gone_prefixes, len(gone) + 1):
            remove_tree(fs, _abs(root, prefix), root)
            _progress("deleted", n=n, total=total, path=prefix)
        for folder in sorted({posixpath.dirname(f) for f in gone}):
            if folder not in folders_now:
                remove_file(fs, _abs(root, f"{folder}/{SUCCESS_MARKER}"))
                remove_empty_parents(fs, _abs(root, folder), root)
    # Records older than the last KEEP_RECORDS are only history: each commit drops the one
    # that falls out (no listing).
    if record.version > KEEP_RECORDS:
        remove_file(fs, _record_path(output, date, record.version - KEEP_RECORDS))
    _progress("published")


# --------------------------------------------------------------------------------------------
# Staging, and tidying a date by listing it (outputs written before run registrations)
# --------------------------------------------------------------------------------------------


def _ls(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    fs.invalidate_cache(folder)
    try:
        return sorted(p.rstrip("/") for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []


def remove_staging(output: str, run_date: str, key: str) -> None:
    """A run's staging folder, and the staging folders above it once empty."""
    fs, root = output_fs(output)
    remove_tree(fs, _abs(root, staging_path(run_date, key)), root)


def collect_folders(output: str, table: str, run_date: str, key: str,
                    record: Record | None, *, dry_run: bool = False) -> list[str]:
    """Remove what run ``key`` wrote in place for ``table`` (maps) on ``run_date`` and
    ``record`` does not name: its dataset folders not in force, and inside those in force
    the folders of bundle attempts their attempts file does not list. Returns the folders
    removed (relative to the root)."""
    fs, root = output_fs(output)
    run_dir = _abs(root, run_folder(table, run_date, key))
    prefixes = record.all_prefixes() if record is not None else set()
    removed = []
    for dataset_dir in _ls(fs, run_dir):
        rel = dataset_dir[len(root) + 1:]
        if rel not in prefixes:
            removed.append(rel)
            continue
        try:
            with fs.open(f"{dataset_dir}/{ATTEMPTS_FILE}", "rb") as f:
                listed = set(json.load(f)["attempts"])
        except FileNotFoundError:
            listed = set()
        for entry in _ls(fs, dataset_dir):
            name = posixpath.basename(entry)
            if name != ATTEMPTS_FILE and name not in listed:
                removed.append(entry[len(root) + 1:])
    if not dry_run:
        for rel in removed:
            if fs.isdir(_abs(root, rel)):
                remove_tree(fs, _abs(root, rel), root)
            else:
                remove_file(fs, _abs(root, rel))
        remove_empty_parents(fs, run_dir, root)
    return removed


def recover_date(output: str, run_date: str, *, keep_run: str | None = None,
                 dry_run: bool = False) -> list[str]:
    """Tidy ``run_date`` by listing it (``python -m pipeline vacuum --deep``; outputs of
    versions before run registrations): delete partition, maps and report files that the
    record in force does not name, the staging folders of runs other than ``keep_run`` (a
    key), and redo the record's publication. Call it only while holding the date's lock.
    Returns the paths removed (relative to the output root)."""
    fs, root = output_fs(output)
    removed: list[str] = []
    record = current_record(output, run_date)
    partitioned = (record.partitioned if record is not None
                   else frozenset(PARTITIONED_TABLES) | set(FOLDER_TABLES))
    for table in sorted(partitioned):
        for dataset_dir in _ls(fs, _abs(root, table)):
            if not posixpath.basename(dataset_dir).startswith("dataset="):
                continue
            for path in _ls(fs, f"{dataset_dir}/{partition_name(run_date)}"):
                rel = path[len(root) + 1:]
                if posixpath.basename(path) == SUCCESS_MARKER:
                    continue
                if record is None or not record.names(rel):
                    if dry_run or remove_file(fs, path):
                        removed.append(rel)
    for table in FOLDER_TABLES:
        for run_dir in _ls(fs, _abs(root, f"{table}/{partition_name(run_date)}")):
            name = posixpath.basename(run_dir)
            if name.startswith("run="):
                removed.extend(collect_folders(output, table, run_date, name[4:], record,
                                               dry_run=dry_run))
    kept_reports = {posixpath.dirname(f) for t, parts in (record.tables.items()
                                                           if record else ())
                    if t not in partitioned for p in parts for f in p.files}
    for folder in _ls(fs, _abs(root, f"{REPORTS_DIR}/{partition_name(run_date)}")):
        rel = folder[len(root) + 1:]
        if rel not in kept_reports:
            if not dry_run:
                fs.rm(folder, recursive=True)
            removed.append(rel)
    if record is not None and not dry_run:
        publish(output, record, record_before(output, record))
    staging = _abs(root, f"{STAGING_DIR}/{partition_name(run_date)}")
    for folder in _ls(fs, staging):
        if keep_run is None or posixpath.basename(folder) != keep_run:
            if not dry_run:
                fs.rm(folder, recursive=True)
            removed.append(folder[len(root) + 1:])
    if not dry_run:
        remove_empty_parents(fs, staging, root)
    if removed and not dry_run:
        LOG.warning("Tidied %s of %s: removed %d files or folders that no record names",
                    run_date, output, len(removed))
    return removed


__all__ = ["COMMITS_DIR", "CommitConflict", "CommitPlan", "KEEP_RECORDS", "KEPT_CARRIED",
           "KEPT_OTHER_DATASET", "KEPT_UP_TO_DATE", "Staged", "collect_folders", "commit_run",
           "final_name", "new_key", "next_record", "preview", "publish", "read_staged",
           "recover_date", "relative", "record_before", "remove_empty_parents", "remove_file",
           "remove_staging", "remove_tree", "stage_empty", "write_staged"]
