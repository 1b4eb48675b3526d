"""Run registrations: each run that holds a date's lock registers itself before it writes
anything, so that what a dead run wrote is found by its key, never by listing the output.

``OUT/_runs/<key>.json`` (a control file) says which run, which date and how far it got:

* ``running``: registered; the run may have written its staging folder, its maps folder
  (``maps/run_date=<d>/run=<key>/``) and its reports folder (``_reports/run_date=<d>/<key>/``),
  all found from the key and the date;
* ``committing``: about to move its part files into the partitions: ``moved`` lists every
  name it will move to (written before the first move);
* ``published``: its record is in force and published.

The registration is removed when the run's leftovers are collected
(``pipeline.core.vacuum``): by the run itself at its end, or by any later run once its lock
is gone.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
from dataclasses import dataclass, replace

from pipeline.core.layout import RUNS_DIR, output_fs, run_entry_path
from pipeline.core.locks import create_exclusive, replace_file

LOG = logging.getLogger(__name__)

RUN_FORMAT = "inctrl-run/1"
RUNNING, COMMITTING, PUBLISHED = "running", "committing", "published"


@dataclass(frozen=True)
class RunEntry:
    """One run's registration."""

    key: str
    run_id: str
    run_date: str
    state: str = RUNNING
    moved: tuple[str, ...] = ()  # part files it moves into partitions (relative to the root)
    started_at: str = ""
    host: str = ""
    pid: int = 0

    def to_json(self) -> dict:
        return {"format": RUN_FORMAT, "key": self.key, "run_id": self.run_id,
                "run_date": self.run_date, "state": self.state, "moved": list(self.moved),
                "started_at": self.started_at, "host": self.host, "pid": self.pid}

    @staticmethod
    def from_json(obj: dict) -> "RunEntry":
        if obj.get("format") != RUN_FORMAT:
            raise ValueError(f"not a run registration: {obj.get('format')!r}")
        return RunEntry(obj["key"], obj["run_id"], obj["run_date"], obj["state"],
                        tuple(obj.get("moved", ())), obj.get("started_at", ""),
                        obj.get("host", ""), int(obj.get("pid", 0)))


def register_run(output: str, key: str, run_id: str, run_date: str) -> RunEntry:
    """Register a run (exclusively: keys are unique) before it writes anything."""
    entry = RunEntry(key, run_id, run_date,
                     started_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     host=socket.gethostname(), pid=os.getpid())
    fs, path = output_fs(run_entry_path(output, key))
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    create_exclusive(fs, path, json.dumps(entry.to_json(), indent=1).encode())
    return entry


def read_run(output: str, key: str) -> RunEntry | None:
    """A run's registration, or None (never registered, or already collected)."""
    fs, path = output_fs(run_entry_path(output, key))
    try:
        with fs.open(path, "rb") as f:
            return RunEntry.from_json(json.load(f))
    except FileNotFoundError:
        return None


def _update(output: str, key: str, **changes) -> None:
    entry = read_run(output, key)
    if entry is None:
        return  # an unregistered run (no lease): nothing to update
    fs, path = output_fs(run_entry_path(output, key))
    replace_file(fs, path, json.dumps(replace(entry, **changes).to_json(), indent=1).encode())


def mark_committing(output: str, key: str, moved: list[str]) -> None:
    """Record, before the first move, every name the run's commit moves a file to."""
    _update(output, key, state=COMMITTING, moved=tuple(moved))


def mark_published(output: str, key: str) -> None:
    """The run's record is in force and its publication done."""
    _update(output, key, state=PUBLISHED)


def list_runs(output: str) -> list[RunEntry]:
    """Every registration under the output root (unreadable ones are logged and skipped)."""
    fs, root = output_fs(output)
    folder = f"{root}/{RUNS_DIR}"
    fs.invalidate_cache(folder)
    try:
        names = sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(folder, detail=False))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with fs.open(f"{folder}/{name}", "rb") as f:
                entries.append(RunEntry.from_json(json.load(f)))
        except FileNotFoundError:
            continue  # collected meanwhile
        except (ValueError, KeyError) as exc:
            LOG.warning("Skipping the unreadable run registration %s/%s (%s)", folder, name,
                        exc)
    return entries


def unregister_run(output: str, key: str) -> None:
    """Remove a run's registration (its files are collected)."""
    fs, path = output_fs(run_entry_path(output, key))
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
