"""The storage invariant (issue 21): a data file, once written, is never written again or
moved onto, and never deleted while the record in force names it; what no record in force
names is superseded or garbage of a dead run, which the next run of any date collects.

A rerun with maps is killed at every step of its commit: the files the record in force
names keep their bytes, and after one run of another date plain folder reads equal record
reads and no data file outside the records in force remains. Then the same for a whole job
with real anomaly maps, a run that loses its commit race, a retried bundle's files and
``python -m pipeline vacuum``."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pytest

import pipeline.core.commit as commit_module
from pipeline.cli import main as cli_main
from pipeline.core.commit import CommitConflict, CommitPlan, commit_run
from pipeline.core.layout import (MAPS, RUNS_DIR, current_files, current_record,
                                  read_current)
from pipeline.core.lease import date_lease
from pipeline.core.locks import DateLock
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.run import run_score
from tests.storage.helpers import child, cli_args, config, plain_pyarrow, rows, tiny_manifest
from tests.storage.killer import stage_run

DATE, OTHER = "2024-08-01", "2024-08-02"
COLS = ["dataset", "image_id", "run_id"]
# Run A writes datasets a, b, c with maps; run B reruns a and b with maps (and a bundle
# attempt that failed): 5 moves (3 parts, 2 reports), then 5 files and 2 map folders of A
# superseded.
RUN_A = {"run": "A", "tables": {SCORES: {"a": 3, "b": 2, "c": 1}, ERRORS: {"b": 1}},
         "maps": {"a": 2, "b": 1, "c": 1}, "owned": ["a", "b", "c"]}
RUN_B = {"run": "B", "tables": {SCORES: {"a": 2, "b": 4}, ERRORS: {"a": 2}},
         "maps": {"a": 2, "b": 3}, "failed_attempt": True, "owned": ["a", "b"]}
KILL_POINTS = [("staged", 0, "A"), ("started", 0, "A"), ("attempts", 0, "A"),
               ("moved", 1, "A"), ("moved", 3, "A"), ("moved", 5, "A"), ("recorded", 0, "B"),
               ("marked", 0, "B"), ("copied", 0, "B"), ("deleted", 1, "B"),
               ("deleted", 5, "B"), ("deleted", 6, "B"), ("deleted", 7, "B"),
               ("published", 0, "B")]
DATA = ("scores/", "errors/", "maps/", "_reports/", "_staging/")


def hashes(out: str) -> dict[str, str]:
    """sha256 of every data file under ``out`` (relative path → digest)."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), out)
            if rel.startswith(DATA) and name != "_SUCCESS":
                with open(os.path.join(folder, name), "rb") as f:
                    found[rel] = hashlib.sha256(f.read()).hexdigest()
    return found


def in_force(out: str, rel: str) -> bool:
    """Whether the record in force of the file's date names it."""
    date = re.search(r"run_date=([0-9-]+)", rel).group(1)
    record = current_record(out, date)
    return record is not None and record.names(rel)


def assert_unchanged(out: str, before: dict[str, str]) -> None:
    """Every file written before that the records in force name still has its bytes."""
    now = hashes(out)
    for rel, digest in before.items():
        if in_force(out, rel):
            assert now.get(rel) == digest, rel


def assert_exact(out: str, dates: list[str]) -> None:
    """Plain folder reads equal record reads; no data file outside the records in force;
    no registration or staging left."""
    for table in (SCORES, ERRORS):
        current = read_current(out, table)
        if not os.path.exists(f"{out}/{table}"):
            assert current.num_rows == 0
            continue
        recorded = rows(current, COLS)
        assert rows(plain_pyarrow(out, table), COLS) == recorded
    outside = [rel for rel in hashes(out) if not in_force(out, rel)]
    assert outside == []
    assert not os.listdir(f"{out}/{RUNS_DIR}") and not os.path.exists(f"{out}/_staging")
    for date in dates:  # every map a row names is in force, and only those
        scores = read_current(out, SCORES, date)
        named = {os.path.relpath(u, out) for c in ("anomaly_map_uri", "overlay_uri")
                 if c in scores.column_names for u in scores[c].to_pylist() if u}
        committed = {os.path.relpath(u, out) for u in current_files(out, MAPS, date)}
        assert named <= committed


def expected_maps(run: str) -> dict[str, set[str]]:
    """The map files in force per dataset (file names) when ``run`` is in force."""
    per = {"A": dict(RUN_A["maps"]), "B": {**RUN_A["maps"], **RUN_B["maps"]}}[run]
    return {d: {f"{d}-{i}.{k}.png" for i in range(n) for k in ("map", "overlay")}
            for d, n in per.items()}


def test_a_rerun_killed_at_every_step_then_a_run_of_another_date(tmp_path):
    started, before = {}, {}
    for step, n, _ in KILL_POINTS:
        out = str(tmp_path / f"{step}-{n}")
        with date_lease(out, DATE, "A") as plan:
            commit_run(plan, stage_run(dict(RUN_A, output=out, date=DATE), plan))
        before[(step, n)] = hashes(out)
        path = tmp_path / f"{step}-{n}.json"
        path.write_text(json.dumps(dict(RUN_B, output=out, date=DATE, step=step, n=n)))
        started[(step, n)] = child("commit", str(path))
    for step, n, in_force_run in KILL_POINTS:
        proc = started[(step, n)]
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == -9, output.decode()[-2000:]  # SIGKILL, at that step
        out = str(tmp_path / f"{step}-{n}")
        record = current_record(out, DATE)
        assert record.run_id == in_force_run, (step, n)
        assert_unchanged(out, before[(step, n)])
        maps = {p.dataset: {os.path.basename(f) for f in current_files(out, MAPS, DATE)
                            if f"/dataset={p.dataset}/" in f}
                for p in record.partitions(MAPS)}
        assert maps == expected_maps(in_force_run), (step, n)
        # One run of another date collects the dead run (its lock is gone).
        with date_lease(out, OTHER, "other") as plan:
            commit_run(plan, stage_run({"output": out, "date": OTHER, "run": "other",
                                        "tables": {SCORES: {"z": 1}}, "maps": {"z": 1}},
                                       plan))
        assert current_record(out, DATE).run_id == in_force_run
        assert_unchanged(out, before[(step, n)])
        assert_exact(out, [DATE, OTHER])


def test_a_run_that_loses_its_commit_race_removes_only_its_own_files(tmp_path, monkeypatch):
    # Issue 21: a loser used to undo by deleting the targets of its moves, which were the
    # record in force's own map files.
    out = str(tmp_path)
    commit_run(*_planned(out, "first", {"a": 1}, {"a": 2}))
    winner_plan, winner = _planned(out, "winner", {"a": 2}, {"a": 1}, base_version=1)
    loser_plan, loser = _planned(out, "loser", {"a": 3}, {"a": 3}, base_version=1)
    original = commit_module._progress

    def winner_commits_meanwhile(step: str, **info) -> None:
        original(step, **info)
        if (step == "moved" and info["n"] == info["total"]
                and loser_plan.commit_id in info["path"]):
            commit_run(winner_plan, winner)  # between the loser's last move and its record

    monkeypatch.setattr(commit_module, "_progress", winner_commits_meanwhile)
    with pytest.raises(CommitConflict, match="Run winner committed record 2"):
        commit_run(loser_plan, loser)
    monkeypatch.setattr(commit_module, "_progress", original)
    now = hashes(out)
    assert current_record(out, DATE).run_id == "winner"
    assert [rel for rel in now if loser_plan.commit_id in rel] == [
        rel for rel in now if rel.startswith("_staging/")]  # its moves and maps: undone
    assert {os.path.basename(f) for f in current_files(out, MAPS, DATE)} == {
        "a-0.map.png", "a-0.overlay.png"}  # the winner's map is there
    assert rows(read_current(out, SCORES), COLS) == [("a", "a-0", "winner"),
                                                      ("a", "a-1", "winner")]


def _planned(out: str, run: str, scores: dict, maps: dict, **plan):
    commit_plan = CommitPlan(out, DATE, run, **plan)
    return commit_plan, stage_run({"output": out, "date": DATE, "run": run,
                                   "tables": {SCORES: scores}, "maps": maps,
                                   "owned": list(scores)}, commit_plan)


def test_a_failed_bundle_attempts_maps_are_garbage_and_collected(tmp_path):
    out = str(tmp_path)
    with date_lease(out, DATE, "r1") as plan:
        staged = stage_run({"output": out, "date": DATE, "run": "r1",
                            "tables": {SCORES: {"a": 1}}, "maps": {"a": 2},
                            "failed_attempt": True}, plan)
        record = commit_run(plan, staged)
        (part,) = record.partitions(MAPS)
        attempts = sorted(os.listdir(f"{out}/{part.prefix}"))
        assert attempts == ["attempts.json", "failedr1", "okr1"]  # named: okr1 only
        assert len(current_files(out, MAPS, DATE)) == 4
    # The run collected its own garbage at its end: the failed attempt's folder.
    assert sorted(os.listdir(f"{out}/{part.prefix}")) == ["attempts.json", "okr1"]
    # The record names one folder per dataset, whatever the number of maps.
    assert part.files == (f"{part.prefix}/attempts.json",)
    assert_exact(out, [DATE])


def test_vacuum_removes_what_dead_runs_left_and_skips_live_dates(tmp_path, capsys):
    out = str(tmp_path)
    with date_lease(out, DATE, "kept") as plan:
        commit_run(plan, stage_run({"output": out, "date": DATE, "run": "kept",
                                    "tables": {SCORES: {"a": 1}}, "maps": {"a": 1}}, plan))
    # A run that died before its commit (its files written, its lock left behind), and a
    # live run of another date.
    dead = str(tmp_path / "dead.json")
    with open(dead, "w") as f:
        json.dump({"output": out, "date": DATE, "run": "dead", "step": "moved", "n": 1,
                   "tables": {SCORES: {"a": 2}}, "maps": {"a": 1}}, f)
    proc = child("commit", dead)
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    live = DateLock(out, OTHER, "live")
    live.acquire()
    try:
        from pipeline.core.runs import register_run
        register_run(out, "livekey", "live", OTHER)
        assert cli_main(["vacuum", "--output", out, "--dry-run"]) == 0
        listed = capsys.readouterr().out
        assert "would remove" in listed and f"skipped {OTHER}" in listed
        assert "_staging" in listed and "/maps/" in listed
        assert len(os.listdir(f"{out}/{RUNS_DIR}")) == 2  # nothing changed
        assert cli_main(["vacuum", "--output", out]) == 0
        done = capsys.readouterr().out
        assert done.count("removed ") == listed.count("would remove ")
        assert os.listdir(f"{out}/{RUNS_DIR}") == ["livekey.json"]  # the live run's stays
    finally:
        live.release()
    assert current_record(out, DATE).run_id == "kept"
    os.remove(f"{out}/{RUNS_DIR}/livekey.json")
    assert_exact(out, [DATE])


@pytest.fixture(scope="module")
def job_manifest(tmp_path_factory) -> str:
    return tiny_manifest(str(tmp_path_factory.mktemp("images")), ["p", "q"], queries=2)


def test_a_job_rerun_killed_after_moving_keeps_the_first_runs_maps(tmp_path, job_manifest):
    # Issue 21's reproduction: maps named by dataset, image, seed and scorer only were moved
    # onto the files the record in force named; killed there, v1's rows showed v2's maps.
    out = str(tmp_path / "out")
    from dataclasses import replace
    run_score(replace(config(job_manifest, out, DATE, "first"), write_anomaly_maps=True))
    first = read_current(out, SCORES)
    assert first["anomaly_map_uri"].null_count == 0
    before = hashes(out)
    ready = str(tmp_path / "ready")
    # Other weights: other maps under the same (dataset, image, seed, scorer).
    proc = child("job", "moved", "-1", ready, "--",
                 *cli_args(job_manifest, out, DATE, "again"), "--write-anomaly-maps",
                 "--pretrained", "random:1")
    deadline = time.monotonic() + 300
    while not os.path.exists(ready):
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the child never reached its last move"
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=30)
    assert current_record(out, DATE).run_id == "first"
    assert_unchanged(out, before)  # every map of the record in force, byte for byte
    for uri in first["anomaly_map_uri"].to_pylist() + first["overlay_uri"].to_pylist():
        with open(uri, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == before[os.path.relpath(uri, out)]
    with date_lease(out, OTHER, "next"):
        pass
    assert_exact(out, [DATE])
