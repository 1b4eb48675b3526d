"""The date lock: one holder at a time, a clear refusal, waiting, heartbeats, takeover of a
dead holder's lock (at once only where its liveness can be seen: same host and PID
namespace), and fencing of a holder that lost it. Exclusive creation underneath."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.core.layout import locks_dir
from pipeline.core.locks import (COLLECT, DateLock, LockHeld, LockLost, StoreNotExclusive,
                                 create_exclusive)

DATE = "2024-03-04"


def test_exclusive_creation_has_exactly_one_winner(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "sub" / "x.json")
    won, lost = [], []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        try:
            create_exclusive(fs, path, json.dumps({"writer": i, "pad": "x" * 10_000}).encode())
            won.append(i)
        except FileExistsError:
            lost.append(i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert json.loads(open(path).read())["writer"] == won[0]  # whole, the winner's
    assert os.listdir(tmp_path / "sub") == ["x.json"]  # no temporary file left


def test_a_second_run_is_refused_with_a_clear_message(tmp_path):
    out = str(tmp_path)
    with DateLock(out, DATE, "night-1"):
        with pytest.raises(LockHeld) as caught:
            DateLock(out, DATE, "night-2").acquire()
    message = str(caught.value)
    assert f"Run date {DATE} of {out} is locked by run 'night-1'" in message
    assert f"pid {os.getpid()}" in message and "in progress" in message
    # Released: the next run takes the next generation.
    with DateLock(out, DATE, "night-3") as token:
        assert token.generation == 2
    assert os.listdir(locks_dir(out, DATE)) == ["0000000002.json"]


def test_a_waiting_run_gets_the_lock_when_the_holder_finishes(tmp_path):
    out = str(tmp_path)
    first = DateLock(out, DATE, "first")
    first.acquire()
    threading.Timer(0.3, first.release).start()
    started = time.monotonic()
    with DateLock(out, DATE, "second", wait_s=10, poll_s=0.05) as token:
        assert token.generation == 2
    assert 0.25 < time.monotonic() - started < 5


def test_heartbeats_keep_a_long_run_locked(tmp_path):
    out = str(tmp_path)
    with DateLock(out, DATE, "long", ttl_s=0.5):
        time.sleep(1.5)  # three TTLs: only the heartbeat keeps the lock fresh
        with pytest.raises(LockHeld):
            DateLock(out, DATE, "other", ttl_s=0.5).acquire()


def _hold_and_die(out: str) -> None:
    code = textwrap.dedent(f"""
        import os, signal
        from pipeline.core.locks import DateLock
        DateLock({out!r}, {DATE!r}, "killed").acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), timeout=120)
    assert done.returncode == -signal.SIGKILL


def test_the_lock_of_a_killed_run_is_taken_over_at_once_on_its_host(tmp_path):
    out = str(tmp_path)
    _hold_and_die(out)
    started = time.monotonic()
    with DateLock(out, DATE, "next") as token:  # default TTL is minutes: the pid decided
        assert token.generation == 2
    assert time.monotonic() - started < 5


def _foreign_lock(out: str, heartbeat_age: float) -> None:
    fs = fsspec.filesystem("file")
    doc = {"format": "inctrl-lock/1", "generation": 1, "run_id": "elsewhere",
           "host": "another-host/boot", "pid": 1, "heartbeat_at": time.time() - heartbeat_age,
           "ttl_s": 60, "released": False}
    create_exclusive(fs, f"{locks_dir(out, DATE)}/0000000001.json", json.dumps(doc).encode())


def test_a_lock_of_another_host_is_stale_only_after_its_ttl(tmp_path):
    _foreign_lock(str(tmp_path / "fresh"), heartbeat_age=5)
    with pytest.raises(LockHeld, match="run 'elsewhere' \\(host another-host, pid 1"):
        DateLock(str(tmp_path / "fresh"), DATE, "me").acquire()
    _foreign_lock(str(tmp_path / "old"), heartbeat_age=61)
    with DateLock(str(tmp_path / "old"), DATE, "me") as token:
        assert token.generation == 2


def test_a_run_that_lost_its_lock_is_fenced_off(tmp_path):
    out = str(tmp_path)
    slow = DateLock(out, DATE, "slow", ttl_s=0.3)
    token = slow.acquire()
    slow._stop.set()  # its heartbeat stops (a frozen process), the lock goes stale
    slow._thread.join()
    time.sleep(0.4)
    with DateLock(out, DATE, "taker", ttl_s=0.3) as taken:
        assert taken.generation == 2
        with pytest.raises(LockLost, match="generation 2 replaced its generation 1"):
            token.check()
        taken.check()
    slow.release()  # no longer its lock: nothing is written
    assert json.loads(open(f"{locks_dir(out, DATE)}/0000000002.json").read())["run_id"] == "taker"


def test_competing_processes_hold_the_lock_one_at_a_time(tmp_path):
    out, log = str(tmp_path / "out"), str(tmp_path / "log")
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.core.locks import DateLock
        with DateLock({out!r}, {DATE!r}, sys.argv[1], wait_s=60, poll_s=0.02):
            with open({log!r}, "a") as f:
                f.write(f"in {{sys.argv[1]}} {{time.time()}}\\n")
            time.sleep(0.2)
            with open({log!r}, "a") as f:
                f.write(f"out {{sys.argv[1]}} {{time.time()}}\\n")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{i}"]) for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 3
    events = [line.split() for line in open(log).read().splitlines()]
    assert len(events) == 6
    for i in range(0, 6, 2):  # strictly nested: in p, out p, in q, out q, ...
        assert events[i][0] == "in" and events[i + 1][0] == "out"
        assert events[i][1] == events[i + 1][1]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _in_own_pid_namespace(code: str, *args: str) -> subprocess.Popen:
    """``python -c code args`` in a PID namespace of its own, with its own /proc (as in a
    container that shares the host's hostname: ``--uts=host``, host networking)."""
    return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-c", textwrap.dedent(code), *args], cwd=os.getcwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.skipif(not _unshare_works(),
                    reason="needs unshare --pid --fork --mount-proc (util-linux, root)")
def test_a_live_lock_is_not_taken_from_another_pid_namespace(tmp_path):
    out = str(tmp_path)
    take = """
        import sys
        from pipeline.core.locks import DateLock, LockHeld
        try:
            DateLock(sys.argv[1], sys.argv[2], "container").acquire()
        except LockHeld as exc:
            print("REFUSED", exc)
            sys.exit(0)
        print("TOOK IT")
        sys.exit(1)
    """
    # The holder in this namespace, the taker in its own: the holder's pid is no process
    # there, yet it lives (issue 21: it used to be taken over at once, the holder LockLost).
    with DateLock(out, DATE, "host-run", ttl_s=60) as token:
        proc = _in_own_pid_namespace(take, out, DATE)
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0, output
        assert "REFUSED" in output and "locked by run 'host-run'" in output
        token.check()  # still ours
    # The other way round: the holder in its own namespace, the taker here.
    hold = """
        import sys, time
        from pipeline.core.locks import DateLock
        DateLock(sys.argv[1], sys.argv[2], "container", ttl_s=60).acquire()
        print("HELD", flush=True)
        time.sleep(60)
    """
    other = str(tmp_path / "other")
    proc = _in_own_pid_namespace(hold, other, DATE)
    try:
        assert proc.stdout.readline().decode().strip() == "HELD"
        with pytest.raises(LockHeld, match="locked by run 'container'"):
            DateLock(other, DATE, "host-run").acquire()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # Once its heartbeat is older than its TTL, the lock is taken over after all.
    path = f"{locks_dir(other, DATE)}/0000000001.json"
    doc = json.loads(open(path).read())
    doc["heartbeat_at"] -= 120
    open(path, "w").write(json.dumps(doc))
    with DateLock(other, DATE, "host-run") as token:
        assert token.generation == 2


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path):
    out = str(tmp_path)
    _hold_and_die(out)
    path = f"{locks_dir(out, DATE)}/0000000001.json"
    doc = json.loads(open(path).read())
    # The dead holder's pid now names a live process (this one), started at another time.
    doc.update(pid=os.getpid(), pid_start="1")
    open(path, "w").write(json.dumps(doc))
    with DateLock(out, DATE, "next") as token:
        assert token.generation == 2


def test_a_run_waits_for_a_collector_instead_of_refusing(tmp_path):
    out = str(tmp_path)
    collector = DateLock(out, DATE, "collector", purpose=COLLECT)
    collector.acquire()
    threading.Timer(0.3, collector.release).start()
    with DateLock(out, DATE, "run", poll_s=0.05) as token:  # wait_s=0, yet it waits
        assert token.generation == 2


class _OverwritingFileSystem(MemoryFileSystem):
    """An in-memory store whose exclusive creation silently overwrites (as some
    S3-compatible servers answer a PUT with If-None-Match: * — 200 and a new object)."""

    protocol = ("overwriting-store",)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("overwriting-store://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        return super()._open(path, mode.replace("x", "w"), **kwargs)


def test_a_store_that_overwrites_on_exclusive_creation_is_refused(tmp_path, capsys):
    fsspec.register_implementation("overwriting-store", _OverwritingFileSystem, clobber=True)
    out = "overwriting-store://bucket/out"
    with pytest.raises(StoreNotExclusive, match="does not honour exclusive creation"):
        DateLock(out, DATE, "run").acquire()
    assert not fsspec.filesystem("overwriting-store").find("/bucket/out/_locks")  # probe gone
    # On the command line: one clear message, exit status 1, nothing scored.
    from pipeline.cli import main as cli_main
    from tests.storage.helpers import cli_args, tiny_manifest

    manifest = tiny_manifest(str(tmp_path / "images"), ["a"])
    assert cli_main(cli_args(manifest, out, DATE, "r")) == 1
    assert "does not honour exclusive creation" in capsys.readouterr().err
    # A store that honours it passes the probe once (the in-memory one here).
    with DateLock("memory://bucket/out", DATE, "run") as token:
        assert token.generation == 1
