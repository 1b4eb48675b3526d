"""A run's hold on its date: the lock, the registration, the collection of dead runs'
files, and at its end the collection of its own leftovers."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from pipeline.core.commit import CommitPlan, new_key
from pipeline.core.layout import record_in_force
from pipeline.core.locks import DEFAULT_TTL_S, DateLock
from pipeline.core.runs import RunEntry, read_run, register_run
from pipeline.core.vacuum import collect_dead_runs, collect_run

LOG = logging.getLogger(__name__)


@contextmanager
def date_lease(output: str, run_date: str, run_id: str, *, wait_s: float = 0.0,
               ttl_s: float = DEFAULT_TTL_S) -> Iterator[CommitPlan]:
    """Hold the date's lock for a run: register the run (before it writes anything),
    collect what dead runs of any date left, then yield the run's :class:`CommitPlan`
    (based on the record now in force, fenced by the lock, with the run's unique key).
    Leaving removes every file of the run that the record in force does not name (all of
    them when it did not commit), drops the registration and releases the lock."""
    lock = DateLock(output, run_date, run_id, wait_s=wait_s, ttl_s=ttl_s)
    token = lock.acquire()
    key = new_key()
    registered = False
    try:
        register_run(output, key, run_id, run_date)
        registered = True
        collect_dead_runs(output, me=key, held_date=run_date, collector=run_id)
        top, _ = record_in_force(output, run_date)
        yield CommitPlan(output, run_date, run_id, base_version=top, fence=token, commit_id=key)
    finally:
        try:
            if registered:
                collect_run(output, read_run(output, key) or RunEntry(key, run_id, run_date))
        finally:
            lock.release()


__all__ = ["date_lease"]
