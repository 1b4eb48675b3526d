"""A child process for the kill tests: runs a commit (or a whole job) and stops itself with
SIGKILL, or waits to be killed, at a chosen step of :mod:`pipeline.core.commit`.

    python -m tests.storage.killer commit SPEC.json
    python -m tests.storage.killer job STEP N READY_FILE -- <python -m pipeline arguments>

``STEP`` is a ``pipeline.core.commit._progress`` step of the commit (``started``,
``attempts``, ``moved``, ``recorded``, ``marked``, ``copied``, ``deleted``, ``published``) or
``staged`` (the files are staged and the maps written, the commit not started);
``N`` the step's ``n`` (the n-th file moved or deleted; 0 for any, -1 for the last). At that
step the child kills itself, or, with a READY_FILE other than ``-``, creates it and sleeps
until killed.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq


def stop_at(step: str, n: int, ready: str | None) -> None:
    """Patch the commit's progress seam to stop the process at ``step`` (its ``n``-th time)."""
    import pipeline.core.commit as commit

    original = commit._progress
    armed = []  # publication steps also run in the recovery before a commit: skip those

    def progress(name: str, **info) -> None:
        original(name, **info)
        armed.extend([True] if name == "started" else [])
        last = n == -1 and info.get("n") == info.get("total")
        if armed and name == step and (not n or info.get("n") == n or last):
            stop(ready)

    commit._progress = progress


def stop(ready: str | None) -> None:
    if ready:
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)  # until the test kills us
    os.kill(os.getpid(), signal.SIGKILL)


def stage_run(spec: dict, plan=None):
    """Write a run's tables as a job would: scores and errors parts per dataset in the
    run's staging folder (every row carrying the run id), a summary naming the run, and,
    with ``spec["maps"]`` (dataset → n), n map and overlay files per dataset written in
    place by one bundle attempt (plus, with ``spec["failed_attempt"]``, the files of an
    attempt that failed, which nothing reports). ``plan``: the run's CommitPlan (default:
    a new one, for a commit without lease)."""
    import fsspec

    from pipeline.core.commit import CommitPlan, Staged, relative
    from pipeline.core.layout import MAPS, NIGHTLY, SUMMARY

    out, date, run = spec["output"], spec["date"], spec["run"]
    plan = plan or CommitPlan(out, date, run)
    base = plan.staging_url()
    fs = fsspec.core.url_to_fs(out)[0]
    parts, reports, attempts = [], [], []
    for table, datasets in spec["tables"].items():
        for dataset, n in datasets.items():
            url = f"{base}/{table}/part-{plan.commit_id}-{len(parts)}-{os.urandom(6).hex()}.parquet"
            fs.makedirs(url.rpartition("/")[0], exist_ok=True)
            rows = pa.table({"image_id": [f"{dataset}-{i}" for i in range(n)],
                             "seed": [0] * n, "run_id": [run] * n})
            with fs.open(url, "wb") as f:
                pq.write_table(rows, f)
            parts.append((table, dataset, relative(out, url)))
    for dataset, n in spec.get("maps", {}).items():
        written = [("ok", True)] + ([("failed", False)] if spec.get("failed_attempt") else [])
        for attempt, succeeded in written:
            folder = f"{out.rstrip('/')}/{plan.folder(MAPS, dataset, f'{attempt}{run}')}"
            fs.makedirs(folder, exist_ok=True)
            for i in range(n):
                for kind in ("map", "overlay"):
                    with fs.open(f"{folder}/{dataset}-{i}.{kind}.png", "wb") as f:
                        f.write(f"{run} {attempt} {dataset} {i} {kind}".encode())
            if succeeded:
                attempts.append((MAPS, dataset, f"{attempt}{run}"))
    for table, name in ((SUMMARY, "summary.json"), (NIGHTLY, "nightly.json")):
        url = f"{base}/reports/{name}"
        fs.makedirs(url.rpartition("/")[0], exist_ok=True)
        with fs.open(url, "w") as f:
            json.dump({"run_id": run}, f)
        reports.append((table, relative(out, url)))
    return Staged(tuple(parts), tuple(reports), tuple(spec.get("owned", ())), tuple(attempts))


def run_commit(spec: dict) -> None:
    """Stage a run and commit it under the date's lock, stopping where ``spec`` says."""
    from pipeline.core.commit import commit_run
    from pipeline.core.lease import date_lease

    stop_at(spec["step"], spec.get("n", 0), spec.get("ready"))
    with date_lease(spec["output"], spec["date"], spec["run"]) as plan:
        staged = stage_run(spec, plan)
        if spec["step"] == "staged":
            stop(spec.get("ready"))
        commit_run(plan, staged)


def main(argv: list[str]) -> int:
    if argv[0] == "commit":
        with open(argv[1]) as f:
            run_commit(json.load(f))
        return 0
    if argv[0] == "job":
        step, n, ready = argv[1], int(argv[2]), argv[3]
        stop_at(step, n, None if ready == "-" else ready)
        from pipeline.cli import main as cli_main

        return cli_main(argv[argv.index("--") + 1:])
    raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
