"""Runs killed with SIGKILL at every step of a commit, and a whole job killed inside its commit
while a second run of the date is refused: afterwards every table reads back whole, from one
run, with no row doubled or lost — through the records at once, and through plain hive
readers once the next run of the date has recovered it."""
from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from pipeline.core.commit import commit_run
from pipeline.core.lease import date_lease
from pipeline.core.layout import (NIGHTLY, SUMMARY, current_record, read_partition,
                                  summary_dir)
from pipeline.core.locks import LockHeld
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.run import run_score
from tests.storage.helpers import (child, cli_args, config, plain_pyarrow, recorded_duckdb,
                                   rows, tiny_manifest)
from tests.storage.killer import stage_run

DATE = "2024-02-03"
# Run A writes datasets a, b, c; run B rescored a and b (other row counts, other errors).
RUN_A = {"run": "A", "tables": {SCORES: {"a": 3, "b": 2, "c": 1}, ERRORS: {"b": 1}},
         "owned": ["a", "b", "c"]}
RUN_B = {"run": "B", "tables": {SCORES: {"a": 2, "b": 4}, ERRORS: {"a": 2}},
         "owned": ["a", "b"]}
# B moves 5 files (3 parts, 2 reports) and deletes 5 of A's (3 parts, 2 reports).
KILL_POINTS = [("staged", 0, "A"), ("started", 0, "A"), ("moved", 1, "A"), ("moved", 3, "A"),
               ("moved", 5, "A"), ("recorded", 0, "B"), ("marked", 0, "B"), ("copied", 0, "B"),
               ("deleted", 2, "B"), ("published", 0, "B")]


def expected(run: str) -> dict[str, list[tuple]]:
    """Each table's ``(dataset, image_id, run_id)`` rows when ``run`` is in force."""
    by_table = {}
    for table in (SCORES, ERRORS):
        datasets = dict(RUN_A["tables"][table])
        if run == "B":
            for d in RUN_B["owned"]:
                datasets.pop(d, None)
            owned_rows = RUN_B["tables"][table]
        else:
            owned_rows = {}
        got = [(d, f"{d}-{i}", "A") for d, n in datasets.items() for i in range(n)]
        got += [(d, f"{d}-{i}", "B") for d, n in owned_rows.items() for i in range(n)]
        by_table[table] = sorted(got)
    return by_table


def assert_whole(out: str, run: str, *, plain: bool) -> None:
    """Every table of the date reads back as run ``run`` left it (``plain``: also through
    plain hive readers and the published summary copy)."""
    want = expected(run)
    record = current_record(out, DATE)
    for table in (SCORES, ERRORS):
        got = rows(read_partition(out, DATE, table), ["dataset", "image_id", "run_id"])
        assert got == want[table], (table, run)
        if plain:
            seen = rows(plain_pyarrow(out, table), ["dataset", "image_id", "run_id"])
            assert seen == want[table], (table, "plain", run)
            assert not [k for k, n in Counter(seen).items() if n > 1]
            duck = recorded_duckdb(out, table, "dataset, image_id, run_id")
            assert sorted(duck) == want[table]
    for report in (SUMMARY, NIGHTLY):
        (part,) = record.partitions(report)
        with open(f"{out}/{part.files[0]}") as f:
            assert json.load(f) == {"run_id": run}
    if plain:
        with open(f"{summary_dir(out, DATE)}/summary.json") as f:
            assert json.load(f) == {"run_id": run}


def commit_a(out: str) -> None:
    with date_lease(out, DATE, "A") as plan:
        commit_run(plan, stage_run(dict(RUN_A, output=out, date=DATE), plan))


def test_a_commit_killed_at_any_step_leaves_one_run_whole(tmp_path):
    started = {}
    for step, n, _ in KILL_POINTS:
        out = str(tmp_path / f"{step}-{n}")
        commit_a(out)
        spec = dict(RUN_B, output=out, date=DATE, step=step, n=n)
        path = tmp_path / f"{step}-{n}.json"
        path.write_text(json.dumps(spec))
        started[(step, n)] = child("commit", str(path))
    for (step, n, in_force) in KILL_POINTS:
        proc = started[(step, n)]
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == -9, output.decode()[-2000:]  # SIGKILL, at that step
        out = str(tmp_path / f"{step}-{n}")
        assert_whole(out, in_force, plain=False)  # at once, through the record
        # The next run of the date takes the dead run's lock over at once (same host, no
        # such process) and tidies: then plain hive readers see the same.
        with date_lease(out, DATE, "next") as plan:
            assert plan.fence.generation == 3
        assert_whole(out, in_force, plain=True)
        assert not os.path.exists(f"{out}/_staging")


@pytest.fixture(scope="module")
def job_manifest(tmp_path_factory) -> str:
    return tiny_manifest(str(tmp_path_factory.mktemp("images")), ["p/q", "r"])


def test_a_job_killed_inside_its_commit_and_a_second_run_refused(tmp_path, job_manifest):
    out = str(tmp_path / "out")
    # The date's result in force (committed as a job would, without paying for a job).
    with date_lease(out, DATE, "first") as plan:
        commit_run(plan, stage_run({"output": out, "date": DATE, "run": "first",
                                    "tables": {SCORES: {"p/q": 2, "r": 1}, ERRORS: {"r": 1}}},
                                   plan))
    before = {t: rows(read_partition(out, DATE, t), ["dataset", "image_id", "run_id"])
              for t in (SCORES, ERRORS)}
    summary_before = open(f"{summary_dir(out, DATE)}/summary.json").read()
    assert {r[2] for r in before[SCORES]} == {"first"} and len(before[SCORES]) == 3

    ready = str(tmp_path / "ready")
    proc = child("job", "moved", "2", ready, "--", *cli_args(job_manifest, out, DATE, "killed"))
    deadline = time.monotonic() + 240
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the child never reached its commit"
        time.sleep(0.2)
    # Two runs of one date at once: the second refuses, naming the first.
    with pytest.raises(LockHeld, match="locked by run 'killed'.*in progress"):
        run_score(config(job_manifest, out, DATE, "second"))
    proc.kill()  # SIGKILL while it is moving its files into the partitions
    proc.wait(timeout=30)
    assert proc.returncode == -9

    # Its files are in the partition folders, but no record names them.
    assert current_record(out, DATE).run_id == "first"
    for table in (SCORES, ERRORS):
        assert rows(read_partition(out, DATE, table),
                    ["dataset", "image_id", "run_id"]) == before[table]
    with date_lease(out, DATE, "recover"):
        pass
    for table in (SCORES, ERRORS):
        assert rows(plain_pyarrow(out, table), ["dataset", "image_id", "run_id"]) == before[table]
    assert open(f"{summary_dir(out, DATE)}/summary.json").read() == summary_before
    assert not os.path.exists(f"{out}/_staging")
