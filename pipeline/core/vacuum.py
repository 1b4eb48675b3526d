"""Collecting what dead runs left: found by run, never by listing the whole output.

Every run registers itself before it writes (:mod:`pipeline.core.runs`) and every file it
writes carries its key, so a run's files are its staging folder, its maps folder, its
reports folder (all found from its key and date) and the part files its registration says
it moved. A run is dead when its date's lock no longer holds it; then every file of it
that the record in force does not name is garbage: superseded (its commit's publication
died), uncommitted (it died before its record) or of a bundle attempt that failed.

:func:`collect_dead_runs` runs at the start of every run, whatever its date (a dead run of
another date is collected under that date's lock, taken for seconds, or left to the run
holding it), and ``python -m pipeline vacuum`` runs it on demand. The cost is what the dead
runs wrote, not what the output holds.
"""
from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.core.commit import (collect_folders, publish, record_before, recover_date,
                                  remove_empty_parents, remove_file, remove_tree)
from pipeline.core.layout import (FOLDER_TABLES, current_record, output_fs, record_dates,
                                  reports_path, run_cache_path, staging_path)
from pipeline.core.locks import COLLECT, DateLock, LockHeld, lock_state
from pipeline.core.runs import PUBLISHED, RunEntry, list_runs, unregister_run

LOG = logging.getLogger(__name__)


@dataclass
class Collected:
    """What a collection removed (paths relative to the output root, folders ending in
    ``/``) and the dates it left alone because a live run holds them."""

    removed: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # "<run id> (<key>, <date>)"
    skipped_dates: list[str] = field(default_factory=list)


def collect_run(output: str, entry: RunEntry, *, dry_run: bool = False) -> list[str]:
    """Remove every file of run ``entry`` that the record in force of its date does not
    name, redo the publication of its record if it is in force and was not published, and
    drop its registration. Call it only for a run that is dead (or for this very run, at
    its end) while holding the date's lock. Returns what was (or, with ``dry_run``, would
    be) removed."""
    fs, root = output_fs(output)
    date, key = entry.run_date, entry.key
    record = current_record(output, date)
    if (record is not None and record.commit_id == key and entry.state != PUBLISHED
            and not dry_run):
        publish(output, record, record_before(output, record))
    removed = []
    for staging in (staging_path(date, key), run_cache_path(date, key)):
        if fs.exists(f"{root}/{staging}"):
            removed.append(f"{staging}/")
            if not dry_run:
                remove_tree(fs, f"{root}/{staging}", root)
    for rel in entry.moved:
        if (record is None or not record.names(rel)) and fs.exists(f"{root}/{rel}"):
            removed.append(rel)
            if not dry_run:
                remove_file(fs, f"{root}/{rel}")
                remove_empty_parents(fs, posixpath.dirname(f"{root}/{rel}"), root)
    reports = reports_path(date, key)
    named = record is not None and any(f.startswith(reports + "/")
                                        for f in record.all_files())
    if not named and fs.exists(f"{root}/{reports}"):
        removed.append(f"{reports}/")
        if not dry_run:
            remove_tree(fs, f"{root}/{reports}", root)
    for table in FOLDER_TABLES:
        removed.extend(f"{r}/" for r in collect_folders(output, table, date, key, record,
                                                         dry_run=dry_run))
    if not dry_run:
        unregister_run(output, key)
    return removed


def _collect_date(output: str, entries: list[RunEntry], found: Collected, *,
                  dry_run: bool) -> None:
    for entry in entries:
        removed = collect_run(output, entry, dry_run=dry_run)
        found.removed.extend(removed)
        found.runs.append(f"{entry.run_id} ({entry.key}, {entry.run_date})")
        if removed and not dry_run:
            LOG.warning("Collected %d files or folders of run %s of %s, which did not "
                        "finish", len(removed), entry.run_id, entry.run_date)


def collect_dead_runs(output: str, *, me: str | None = None, held_date: str | None = None,
                      dry_run: bool = False, collector: str = "vacuum") -> Collected:
    """Collect every registered run but ``me`` whose lock is gone. Runs of ``held_date``
    (whose lock the caller holds) are collected directly; those of another date under that
    date's lock, taken for the collection (purpose ``collect``: a run of that date starting
    meanwhile waits), or skipped while a live run holds it. ``dry_run`` changes nothing:
    a date is skipped when its lock is live."""
    found = Collected()
    by_date: dict[str, list[RunEntry]] = defaultdict(list)
    for entry in list_runs(output):
        if entry.key != me:
            by_date[entry.run_date].append(entry)
    for date, entries in sorted(by_date.items()):
        if date == held_date:
            _collect_date(output, entries, found, dry_run=dry_run)
            continue
        if dry_run:
            if lock_state(output, date) == "live":
                found.skipped_dates.append(date)
            else:
                _collect_date(output, entries, found, dry_run=True)
            continue
        lock = DateLock(output, date, f"collector ({collector})", purpose=COLLECT)
        try:
            lock.acquire()
        except LockHeld:
            found.skipped_dates.append(date)  # a live run holds it: it collects at its end
            continue
        try:
            _collect_date(output, entries, found, dry_run=False)
        finally:
            lock.release()
    return found


def vacuum(output: str, *, dry_run: bool = False, deep: bool = False) -> Collected:
    """``python -m pipeline vacuum``: collect every dead run's files now; with ``deep``
    also list every date with a record and remove what no record names (for outputs
    written before runs registered themselves; costs a listing of every date)."""
    found = collect_dead_runs(output, dry_run=dry_run)
    if not deep:
        return found
    for date in record_dates(output):
        if dry_run:
            if lock_state(output, date) == "live":
                found.skipped_dates.append(date)
            else:
                found.removed.extend(recover_date(output, date, dry_run=True))
            continue
        lock = DateLock(output, date, "collector (vacuum --deep)", purpose=COLLECT)
        try:
            lock.acquire()
        except LockHeld:
            found.skipped_dates.append(date)
            continue
        try:
            found.removed.extend(recover_date(output, date))
        finally:
            lock.release()
    return found


__all__ = ["Collected", "collect_dead_runs", "collect_run", "vacuum"]
