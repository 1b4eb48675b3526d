"""Outputs on an object store: a local S3-compatible server (moto's server mode on 127.0.0.1,
started and stopped here) reached through s3fs, configured as a user would (endpoint and
keys in the environment). Score, rerun the date, kill commits (maps included) and let a run
of another date collect them, vacuum, take the lock, lose conditional creates (409 and
412); every table reads back whole through pyarrow, pandas and DuckDB."""
from __future__ import annotations

import json
import socket
import threading
import time

import pandas as pd
import pytest

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from pipeline.core.lease import date_lease  # noqa: E402
from pipeline.core.layout import (PARTITIONING, current_files, current_record,  # noqa: E402
                                  read_partition, summary_dir)
from pipeline.core.locks import DateLock, LockHeld, create_exclusive  # noqa: E402
from pipeline.core.schemas import ERRORS, SCORES  # noqa: E402
from pipeline.run import run_score  # noqa: E402
from tests.storage.helpers import (child, config, plain_pyarrow, recorded_duckdb,  # noqa: E402
                                   recorded_pyarrow, rows, tiny_manifest)
from tests.storage.killer import stage_run  # noqa: E402

DATE, OTHER = "2024-06-07", "2024-06-08"
BUCKET = "inctrl-test"
COLS = ["dataset", "image_id", "run_id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 and an s3fs file system for it (from the environment)."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_manifest(str(tmp_path_factory.mktemp("s3-images")), ["a/b", "ä b"])


def read_all(out: str, fs) -> dict:
    """Every table of the date through the record, and the scores three ways."""
    return {"scores": rows(read_partition(out, DATE), COLS),
            "errors": rows(read_partition(out, DATE, ERRORS), COLS) if read_partition(
                out, DATE, ERRORS) is not None else [],
            "pyarrow": rows(recorded_pyarrow(out, SCORES, filesystem=fs), COLS),
            "duckdb": recorded_duckdb(out, SCORES, "dataset, image_id, run_id",
                                      filesystem=fs)}


def test_score_and_rerun_on_s3(s3, manifest):
    out = f"s3://{BUCKET}/scoring"
    run_score(config(manifest, out, DATE, "first"))
    first = read_all(out, s3)
    assert [r[2] for r in first["scores"]] == ["first", "first"]
    assert {r[0] for r in first["scores"]} == {"a/b", "ä b"}
    assert first["pyarrow"] == first["scores"] == first["duckdb"]

    run_score(config(manifest, out, DATE, "again"))  # the same date again: replaced
    again = read_all(out, s3)
    assert again["scores"] == [(d, i, "again") for d, i, _ in first["scores"]]
    assert again["pyarrow"] == again["scores"] == again["duckdb"]
    # Plain hive readers see the same rows (the superseded objects are deleted).
    assert rows(plain_pyarrow(out, SCORES, filesystem=s3), COLS) == again["scores"]
    frame = pd.read_parquet([f.split("://", 1)[1] for f in current_files(out, SCORES)],
                            filesystem=s3, partitioning=PARTITIONING)
    assert sorted(zip(frame["dataset"], frame["run_id"])) == [(d, r) for d, _, r in
                                                              again["scores"]]
    with s3.open(f"{summary_dir(out, DATE)}/summary.json") as f:
        assert json.load(f)["extra"]["run_id"] == "again"
    assert current_record(out, DATE).version == 2
    assert not s3.find(f"{BUCKET}/scoring/_staging")


def data_files(s3, out: str) -> dict[str, bytes]:
    """Every data file under ``out`` (relative path → bytes): tables, maps, reports, staging."""
    s3.invalidate_cache()
    base = out.split("://", 1)[1]
    found = {}
    for path in s3.find(base):
        rel = path[len(base) + 1:]
        if rel.startswith(("scores/", "errors/", "maps/", "_reports/", "_staging/")) and (
                not rel.endswith("/_SUCCESS")):
            found[rel] = s3.cat_file(path)
    return found


def named(out: str, rel: str) -> bool:
    date = rel.split("run_date=", 1)[1][:10]
    record = current_record(out, date)
    return record is not None and record.names(rel)


def test_commits_killed_on_s3_then_a_run_of_another_date(s3, tmp_path):
    from pipeline.core.commit import commit_run

    # before the moves, during them, after the record
    points = [("attempts", 0, "A"), ("moved", 2, "A"), ("deleted", 1, "B")]
    procs, before = {}, {}
    for step, n, _ in points:
        out = f"s3://{BUCKET}/killed-{step}"
        spec = {"output": out, "date": DATE, "tables": {SCORES: {"a": 2, "b": 1}},
                "maps": {"a": 1, "b": 1}}
        with date_lease(out, DATE, "A") as plan:
            commit_run(plan, stage_run(dict(spec, run="A", owned=["a", "b"]), plan))
        before[step] = data_files(s3, out)
        path = tmp_path / f"{step}.json"
        path.write_text(json.dumps(dict(spec, run="B", tables={SCORES: {"a": 3}}, owned=["a"],
                                        maps={"a": 2}, failed_attempt=True, step=step, n=n)))
        procs[step] = child("commit", str(path))
    for step, n, in_force in points:
        output, _ = procs[step].communicate(timeout=120)
        assert procs[step].returncode == -9, output.decode()[-3000:]
        out = f"s3://{BUCKET}/killed-{step}"
        want = sorted([("a", f"a-{i}", in_force) for i in range(2 if in_force == "A" else 3)]
                      + [("b", "b-0", "A")])
        s3.invalidate_cache()
        assert rows(read_partition(out, DATE), COLS) == want
        now = data_files(s3, out)
        for rel, data in before[step].items():  # the record in force's files: unchanged
            if named(out, rel):
                assert now[rel] == data, rel
        # A run of another date takes the dead run's lock over and collects its files.
        with date_lease(out, OTHER, "next") as plan:
            commit_run(plan, stage_run({"output": out, "date": OTHER, "run": "next",
                                        "tables": {SCORES: {"z": 1}}}, plan))
        assert rows(plain_pyarrow(out, SCORES, filesystem=s3), COLS) == sorted(
            want + [("z", "z-0", "next")])
        assert recorded_duckdb(out, SCORES, "dataset, image_id, run_id",
                               filesystem=s3) == sorted(want + [("z", "z-0", "next")])
        assert [rel for rel in data_files(s3, out) if not named(out, rel)] == []
        assert not s3.find(f"{BUCKET}/killed-{step}/_runs")


def test_vacuum_on_s3(s3, tmp_path, capsys):
    from pipeline.cli import main as cli_main

    out = f"s3://{BUCKET}/vacuum"
    spec = {"output": out, "date": DATE, "run": "dead", "tables": {SCORES: {"a": 1}},
            "maps": {"a": 1}, "step": "attempts", "n": 0}
    path = tmp_path / "dead.json"
    path.write_text(json.dumps(spec))
    proc = child("commit", str(path))
    assert proc.communicate(timeout=120) and proc.returncode == -9
    assert data_files(s3, out)  # its staging and its maps
    assert cli_main(["vacuum", "--output", out]) == 0
    assert "1 dead runs" in capsys.readouterr().out
    assert data_files(s3, out) == {} and not s3.find(f"{BUCKET}/vacuum/_runs")


def _client_error(code: str, status: int, condition: str | None = None):
    """The error s3fs raises for an S3 answer (``translate_boto_error`` of botocore's)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = {"Code": code, "Message": f"{code} (test)"}
    if condition:
        error["Condition"] = condition
    return translate_boto_error(ClientError(
        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))


@pytest.mark.parametrize("code, status, condition", [
    ("ConditionalRequestConflict", 409, None), ("PreconditionFailed", 412, None),
    ("PreconditionFailed", 412, "If-None-Match")])
def test_a_lost_conditional_create_is_someone_else_winning(s3, monkeypatch, code, status,
                                                           condition):
    from s3fs.core import S3File

    from pipeline.cli import EXIT_LOCKED
    from pipeline.core.commit import CommitConflict, CommitPlan, commit_run
    from pipeline.core.locks import DateLock

    out = f"s3://{BUCKET}/race-{status}-{condition}"
    raised = _client_error(code, status, condition)
    if code == "ConditionalRequestConflict":
        assert type(raised) is OSError  # s3fs: not FileExistsError (issue 21)
    original = S3File.commit
    calls = {"n": 0}

    def lose_once(self):
        if "x" in self.mode and calls["n"] == 0 and "/_locks/run_date" in self.path:
            calls["n"] += 1
            # The other writer, meanwhile: its lock document, live.
            DateLock(out, DATE, "other-writer", ttl_s=60)._fs.pipe_file(
                self.path, json.dumps({"format": "inctrl-lock/1", "generation": 1,
                                       "run_id": "other-writer", "host": "elsewhere",
                                       "pid": 1, "heartbeat_at": time.time(), "ttl_s": 60,
                                       "released": False}).encode())
            raise raised
        return original(self)

    monkeypatch.setattr(S3File, "commit", lose_once)
    with pytest.raises(LockHeld, match="locked by run 'other-writer'"):
        DateLock(out, DATE, "me").acquire()  # was a crash on 409, not "exit 4"
    assert issubclass(LockHeld, Exception) and EXIT_LOCKED == 4

    # In the commit: the record's conditional create loses; what was moved is undone.
    plan = CommitPlan(out, DATE, "loser")
    staged = stage_run({"output": out, "date": DATE, "run": "loser",
                        "tables": {SCORES: {"a": 1}}, "maps": {"a": 1}}, plan)

    def lose_record(self):
        if "x" in self.mode and "/_commits/" in self.path:
            raise raised
        return original(self)

    monkeypatch.setattr(S3File, "commit", lose_record)
    with pytest.raises(CommitConflict):
        commit_run(plan, staged)
    monkeypatch.setattr(S3File, "commit", original)
    left = [rel for rel in data_files(s3, out) if not rel.startswith("_staging/")]
    assert left == []  # its moved part, its maps and reports: removed, nothing else


def test_the_lock_and_exclusive_creation_on_s3(s3):
    out = f"s3://{BUCKET}/locks"
    with DateLock(out, DATE, "holder"):
        with pytest.raises(LockHeld, match="locked by run 'holder'"):
            DateLock(out, DATE, "other").acquire()
    with DateLock(out, DATE, "next") as token:
        assert token.generation == 2
    won, barrier = [], threading.Barrier(4)

    def create(i: int) -> None:
        barrier.wait()
        try:
            create_exclusive(s3, f"{BUCKET}/locks/race.json", str(i).encode())
            won.append(i)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and s3.cat_file(f"{BUCKET}/locks/race.json") == str(won[0]).encode()
