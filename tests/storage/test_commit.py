"""The commit: one record per change of a date; reruns replace what they cover and keep the
rest; a run whose base moved on is refused; retries and recovery are idempotent; the README's
reading recipes give the tables in force."""
from __future__ import annotations

import json
import os
import threading

import pyarrow.parquet as pq
import pytest

from pipeline.core.commit import (KEEP_RECORDS, CommitConflict, CommitPlan, Staged, commit_run,
                                  recover_date)
from pipeline.core.lease import date_lease
from pipeline.core.layout import (DRIFT, SUCCESS_MARKER, SUMMARY, commits_dir,
                                  current_record, partition_dir, read_partition,
                                  record_versions, summary_dir)
from pipeline.core.schemas import ERRORS, SCORES
from tests.storage.helpers import (plain_pyarrow, recorded_duckdb, recorded_pandas,
                                   recorded_pyarrow, rows)
from tests.storage.killer import stage_run

DATE = "2024-04-05"
COLS = ["dataset", "image_id", "run_id"]


def run(out: str, name: str, scores: dict, errors: dict | None = None, owned=None,
        reports: bool = True, **plan) -> tuple[CommitPlan, Staged]:
    spec = {"output": out, "date": DATE, "run": name,
            "tables": {SCORES: scores, ERRORS: errors or {}},
            "owned": list(owned if owned is not None else scores)}
    commit_plan = CommitPlan(out, DATE, name, **plan)
    staged = stage_run(spec, commit_plan)
    if not reports:
        staged = Staged(staged.parts, (), staged.datasets)
    return commit_plan, staged


def test_a_rerun_replaces_its_datasets_and_keeps_the_others(tmp_path):
    out = str(tmp_path)
    commit_run(*run(out, "r1", {"a/b": 2, "a_b": 1, "c": 1}, {"c": 1}))
    first_c = sorted(os.listdir(partition_dir(out, SCORES, "c", DATE)))
    record = commit_run(*run(out, "r2", {"a_b": 3}))
    assert record.version == 2
    assert rows(read_partition(out, DATE), COLS) == sorted(
        [("a/b", "a/b-0", "r1"), ("a/b", "a/b-1", "r1"), ("c", "c-0", "r1")]
        + [("a_b", f"a_b-{i}", "r2") for i in range(3)])
    assert rows(read_partition(out, DATE, ERRORS), COLS) == [("c", "c-0", "r1")]
    assert sorted(os.listdir(partition_dir(out, SCORES, "c", DATE))) == first_c  # untouched
    # Plain hive readers see the same: the superseded a_b file is gone.
    assert rows(plain_pyarrow(out, SCORES), COLS) == rows(read_partition(out, DATE), COLS)
    # The reports are the last run's; markers name the run of each partition.
    with open(f"{summary_dir(out, DATE)}/summary.json") as f:
        assert json.load(f) == {"run_id": "r2"}
    marker = f"{partition_dir(out, SCORES, 'a_b', DATE)}/{SUCCESS_MARKER}"
    assert open(marker).read() == "r2\n"
    assert open(f"{partition_dir(out, SCORES, 'c', DATE)}/{SUCCESS_MARKER}").read() == "r1\n"


def _night(out: str) -> None:
    """A nightly-like run: scores, summary, nightly and a drift report."""
    plan, staged = run(out, "night", {"a": 1, "b": 1})
    drift = f"{plan.staging}/reports/drift.json"
    os.makedirs(os.path.dirname(f"{out}/{drift}"), exist_ok=True)
    with open(f"{out}/{drift}", "w") as f:
        json.dump({"night": 1}, f)
    commit_run(plan, staged + Staged(reports=((DRIFT, drift),)))


def test_reports_a_run_does_not_write_leave_the_record(tmp_path):
    # Behaviour changed on purpose (issue 21): a score rerun of a nightly date used to keep
    # the night's drift in its record and in summary/run_date=.
    out = str(tmp_path)
    _night(out)
    plan, staged = run(out, "score", {"a": 2})
    staged = Staged(staged.parts, tuple(r for r in staged.reports if r[0] == SUMMARY),
                    staged.datasets)
    record = commit_run(plan, staged)
    assert set(record.tables) == {SCORES, SUMMARY}
    assert [k.table for k in record.kept] == [SCORES]  # dataset b's scores, nothing else
    assert sorted(os.listdir(summary_dir(out, DATE))) == ["summary.json"]


def test_what_a_run_keeps_of_an_earlier_run_is_said_in_its_record(tmp_path):
    out = str(tmp_path)
    _night(out)
    plan, staged = run(out, "rerun", {"a": 2}, reports=False)
    record = commit_run(plan, staged + Staged(kept=((DRIFT, None, None, "on purpose"),)))
    assert set(record.tables) == {SCORES, DRIFT}
    assert {(k.table, k.dataset, k.run_id, k.reason) for k in record.kept} == {
        (DRIFT, None, "night", "on purpose"), (SCORES, "b", "night", "dataset not in this run")}
    assert record.partitions(DRIFT)[0].run_id == "night"
    assert current_record(out, DATE).kept == record.kept  # as written in the record


def test_a_run_whose_base_moved_on_is_refused_and_leaves_nothing(tmp_path):
    out = str(tmp_path)
    commit_run(*run(out, "r1", {"a": 1}))
    late, staged = run(out, "late", {"a": 5}, base_version=1)
    commit_run(*run(out, "r2", {"a": 2}))
    before = sorted(os.listdir(partition_dir(out, SCORES, "a", DATE)))
    with pytest.raises(CommitConflict, match="started from commit record 1.*record 2"):
        commit_run(late, staged)
    assert current_record(out, DATE).run_id == "r2"
    assert sorted(os.listdir(partition_dir(out, SCORES, "a", DATE))) == before


def test_two_commits_racing_for_one_version(tmp_path):
    out = str(tmp_path)
    commit_run(*run(out, "r0", {"a": 1}))
    plans = [run(out, f"racer{i}", {"a": 2 + i}, base_version=1) for i in range(2)]
    results, barrier = {}, threading.Barrier(2)

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = commit_run(*plans[i]).run_id
        except CommitConflict as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results.values() if isinstance(r, str)]
    assert len(winners) == 1 and isinstance(results[1 - int(winners[0][-1])], CommitConflict)
    n = 2 + int(winners[0][-1])
    assert rows(read_partition(out, DATE), COLS) == [("a", f"a-{i}", winners[0])
                                                     for i in range(n)]
    assert rows(plain_pyarrow(out, SCORES), COLS) == rows(read_partition(out, DATE), COLS)


def test_a_retried_commit_is_not_applied_twice(tmp_path):
    out = str(tmp_path)
    plan, staged = run(out, "r1", {"a": 2})
    first = commit_run(plan, staged)
    again = commit_run(plan, staged)  # e.g. a worker retrying the commit step
    assert again == first and record_versions(out, DATE) == [1]


def test_recovery_removes_what_no_record_names(tmp_path):
    out = str(tmp_path)
    commit_run(*run(out, "r1", {"a": 1, "b": 1}))
    # Left by dead runs: moved part files, a report folder, a staging folder.
    for name in ("part-dead.parquet", "part-dead-2.parquet"):
        pq.write_table(pq.read_table(next(
            f"{partition_dir(out, SCORES, 'a', DATE)}/{n}"
            for n in os.listdir(partition_dir(out, SCORES, "a", DATE)) if n.endswith(".parquet"))),
            f"{partition_dir(out, SCORES, 'a', DATE)}/{name}")
    os.makedirs(f"{out}/_reports/run_date={DATE}/deadbeef")
    stage_run({"output": out, "date": DATE, "run": "dead", "tables": {SCORES: {"a": 1}}})
    assert len(plain_pyarrow(out, SCORES)) == 4  # plain readers see the dead run's rows
    removed = recover_date(out, DATE)
    assert len(removed) == 4
    assert rows(plain_pyarrow(out, SCORES), COLS) == [("a", "a-0", "r1"), ("b", "b-0", "r1")]
    assert not os.path.exists(f"{out}/_staging")
    assert recover_date(out, DATE) == []  # idempotent


def test_old_records_are_pruned(tmp_path):
    out = str(tmp_path)
    for i in range(KEEP_RECORDS + 3):
        commit_run(*run(out, f"r{i}", {"a": 1}, reports=False))
    assert record_versions(out, DATE) == list(range(4, KEEP_RECORDS + 4))
    assert len(os.listdir(commits_dir(out, DATE))) == KEEP_RECORDS


def test_the_readme_recipes_read_the_tables_in_force(tmp_path):
    out = str(tmp_path)
    with date_lease(out, DATE, "r1") as plan:
        commit_run(plan, stage_run({"output": out, "date": DATE, "run": "r1",
                                    "tables": {SCORES: {"123": 1, "a/b": 2, "ä b": 1}}}, plan))
    # A dead run's file in a partition: the recipes (the records) never see it.
    stage = run(out, "dead", {"a/b": 1})[1]
    dead_dir = partition_dir(out, SCORES, "a/b", DATE)
    os.rename(f"{out}/{stage.parts[0][2]}", f"{dead_dir}/part-dead.parquet")

    want = [("123", "123-0", "r1"), ("a/b", "a/b-0", "r1"), ("a/b", "a/b-1", "r1"),
            ("ä b", "ä b-0", "r1")]
    assert rows(recorded_pyarrow(out, SCORES), COLS) == want
    frame = recorded_pandas(out, SCORES)
    assert sorted(zip(frame["dataset"].astype(str), frame["image_id"], frame["run_id"])) == want
    assert recorded_duckdb(out, SCORES, "dataset, image_id, run_id") == want
    assert {str(v) for v in frame["run_date"]} == {DATE}
