"""Outputs on an object store: a local S3-compatible server (moto's server mode on 127.0.0.1,
started and stopped here) reached through s3fs, configured as a user would (endpoint and
keys in the environment). Score, rerun the date, kill commits, take the lock; every table
reads back whole through pyarrow, pandas and DuckDB."""
from __future__ import annotations

import json
import socket
import threading

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

DATE = "2024-06-07"
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


def test_commits_killed_on_s3_leave_one_run_whole(s3, tmp_path):
    from pipeline.core.commit import commit_run

    points = [("moved", 2, "A"), ("deleted", 1, "B")]  # before and after the record
    procs = {}
    for step, n, _ in points:
        out = f"s3://{BUCKET}/killed-{step}"
        spec = {"output": out, "date": DATE, "tables": {SCORES: {"a": 2, "b": 1}}}
        with date_lease(out, DATE, "A") as plan:
            commit_run(plan, stage_run(dict(spec, run="A", owned=["a", "b"]), plan))
        path = tmp_path / f"{step}.json"
        path.write_text(json.dumps(dict(spec, run="B", tables={SCORES: {"a": 3}}, owned=["a"],
                                        step=step, n=n)))
        procs[step] = child("commit", str(path))
    for step, n, in_force in points:
        output, _ = procs[step].communicate(timeout=120)
        assert procs[step].returncode == -9, output.decode()[-3000:]
        out = f"s3://{BUCKET}/killed-{step}"
        want = sorted([("a", f"a-{i}", in_force) for i in range(2 if in_force == "A" else 3)]
                      + [("b", "b-0", "A")])
        s3.invalidate_cache()
        assert rows(read_partition(out, DATE), COLS) == want
        with date_lease(out, DATE, "next"):  # takes the dead run's lock over, tidies
            pass
        assert rows(plain_pyarrow(out, SCORES, filesystem=s3), COLS) == want
        assert recorded_duckdb(out, SCORES, "dataset, image_id, run_id", filesystem=s3) == want


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
