"""Atomic file primitives, and one lock per (output root, run date), on local disks and object
stores alike.

* :func:`create_exclusive` makes a file whole or fails with ``FileExistsError`` when it exists:
  a hard link of a fully written temporary file on local (and NFS) disks, a conditional PUT
  (``If-None-Match: *``, fsspec mode ``"xb"``) on S3 with s3fs; other fsspec file systems use
  their ``"xb"`` mode (gcsfs: experimental; in-memory: per process). A store's answer that
  another writer won or is winning (S3: 412 Precondition Failed, 409
  ConditionalRequestConflict) is ``FileExistsError`` whatever the client made of it.
  :func:`check_exclusive` probes once per output root that the store honours it.
* :func:`move_file` never moves onto an existing file (``FileExistsError``); data files
  are never rewritten. :func:`replace_file` and :func:`copy_file` overwrite a file whole
  (temporary file + rename locally, one PUT / server-side copy on object stores): only for
  control files and derived copies.
* :class:`DateLock` is held by one run of a date at a time. The lock is a series of
  generation-numbered files ``OUT/_locks/run_date=<d>/<generation>.json``, each created
  exclusively, so of two runs that find the lock free (or stale) only one creates the next
  generation. The holder rewrites its file's heartbeat every ``ttl_s / 10`` seconds and marks
  it released at the end. A lock is stale when its heartbeat is older than its TTL, or at once
  when its process is seen gone: on this very host (hostname and boot id), in this very PID
  namespace (containers sharing a hostname each have their own: there a pid says nothing),
  and no longer running (or its pid now belongs to a process started later). A newer
  generation then takes over. A run that lost its lock learns it from
  :meth:`LockToken.check` (a newer generation exists), which the commit calls right before
  it writes its record.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.layout import LOCKS_DIR, locks_dir, output_fs

LOG = logging.getLogger(__name__)

DEFAULT_TTL_S = 300.0
LOCK_FORMAT = "inctrl-lock/1"
#: What a lock is held for: a run of the date, or collecting dead runs' files (seconds).
RUN, COLLECT = "run", "collect"
#: How long a run waits for a collector holding its date, even when told not to wait.
COLLECT_WAIT_S = 60.0
#: Protocols whose exclusive creation is known to be atomic (see the module docstring).
EXCLUSIVE_PROTOCOLS = {"file", "local", "s3", "s3a", "memory", "gs", "gcs"}

_warned: set[str] = set()


class LockHeld(RuntimeError):
    """Another live run holds the date's lock."""


class LockLost(RuntimeError):
    """This run's lock was taken over by another run (it was found stale)."""


class StoreNotExclusive(RuntimeError):
    """The output's store silently overwrites on exclusive creation: no lock or record of
    this job can be trusted there."""


# --------------------------------------------------------------------------------------------
# Atomic file primitives
# --------------------------------------------------------------------------------------------


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(folder: str, name: str, data: bytes) -> str:
    os.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create ``path`` holding ``data``, whole, or raise ``FileExistsError`` if it exists."""
    if is_local(fs):
        folder, _, name = path.rpartition("/")
        tmp = _write_temp(folder, name, data)
        try:
            os.link(tmp, path)  # fails when path exists; atomic on local disks and NFS
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                 errno.EMLINK):
                raise
            # No hard links here (some FUSE and FAT mounts): still exclusive, not whole.
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
        _fsync_dir(folder)
        return
    protocols = _protocols(fs)
    if not protocols & EXCLUSIVE_PROTOCOLS and not protocols & _warned:
        _warned.update(protocols)
        LOG.warning("Exclusive creation on %s is not known to be atomic: two runs of one date "
                    "committing at the same instant may not be told apart", sorted(protocols))
    if not data:
        raise ValueError("exclusive creation needs content: s3fs writes an empty file "
                         "without its condition")
    parent = path.rpartition("/")[0]
    try:
        with fs.open(path, "xb") as f:  # s3fs: PUT with If-None-Match: *
            f.write(data)
    except FileExistsError:
        raise
    except OSError as exc:
        if not _someone_else_won(exc):
            raise
        raise FileExistsError(errno.EEXIST, f"{path} exists or is being created by another "
                              f"writer ({exc})", path) from exc
    finally:
        fs.invalidate_cache(parent)


#: S3's answers to a conditional PUT whose condition another writer defeated: 412 (the
#: object exists), 409 (a concurrent conditional write to the same key is in progress).
LOST_RACE_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
LOST_RACE_STATUS = {409, 412}


def _someone_else_won(exc: BaseException) -> bool:
    """Whether an error of a conditional create says another writer won (or is winning).
    s3fs turns 412 into ``FileExistsError`` only when the error names ``If-None-Match`` and
    409 into a plain ``OSError``; the store's own code is on the boto error it wraps."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if error.get("Code") in LOST_RACE_CODES or status in LOST_RACE_STATUS:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


_probed: set[str] = set()


def check_exclusive(output: str) -> None:
    """Make sure, once per output root and process, that the output's store refuses a
    second exclusive creation of one object (a probe object created twice); local disks
    need no probe. Raises :class:`StoreNotExclusive` with one clear message otherwise."""
    fs, root = output_fs(output)
    if is_local(fs) or output.rstrip("/") in _probed:
        return
    path = f"{root}/{LOCKS_DIR}/_probe-{uuid.uuid4().hex}"
    try:
        create_exclusive(fs, path, b"first")
    except (ValueError, NotImplementedError) as exc:  # no "xb" mode in this client
        raise StoreNotExclusive(
            f"The file system of {output} cannot create a file exclusively ({exc}); the "
            "date lock and the commit record need it.") from exc
    try:
        create_exclusive(fs, path, b"second")
    except FileExistsError:
        _probed.add(output.rstrip("/"))
        return
    finally:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
    raise StoreNotExclusive(
        f"The store of {output} does not honour exclusive creation: a second conditional "
        "create (If-None-Match: *) of the same object succeeded and overwrote it. The date "
        "lock and the commit record rely on it, so two runs could both believe they hold a "
        "date or both commit it. Use a store that supports conditional writes (AWS S3, GCS, "
        "a local or NFS disk), or a newer version of this S3-compatible server.")


def replace_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` whole: a reader sees the old or the new content, never part of it."""
    if is_local(fs):
        folder, _, name = path.rpartition("/")
        os.replace(_write_temp(folder, name, data), path)
        return
    fs.pipe_file(path, data)
    fs.invalidate_cache(path.rpartition("/")[0])


def copy_file(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Copy ``source`` over ``target``, which readers see whole before and after."""
    if is_local(fs):
        folder, _, name = target.rpartition("/")
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return
    fs.cp_file(source, target)  # one server-side copy on object stores (copy() lists)
    fs.invalidate_cache(target.rpartition("/")[0])


def move_file(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move one file to a name that does not exist yet (``FileExistsError`` if it does):
    a hard link and unlink on local disks (the link fails on an existing name, atomically),
    copy + delete on object stores."""
    if is_local(fs):
        os.makedirs(target.rpartition("/")[0], exist_ok=True)
        try:
            os.link(source, target)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                 errno.EMLINK):
                raise
            # No hard links here: names are unique to their run, the check is a safeguard.
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "move target exists", target) from exc
            os.rename(source, target)
            return
        os.unlink(source)
        return
    if object_exists(fs, target):
        raise FileExistsError(errno.EEXIST, "move target exists", target)
    fs.cp_file(source, target)  # mv() and copy() list both paths first: one file here
    fs.rm_file(source)
    fs.invalidate_cache(target.rpartition("/")[0])


def object_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the (non-empty) file ``path`` exists, in one request: a one-byte read.
    ``exists()`` on an object store also lists the key as a folder when no object has it,
    which costs what the folder's bucket holds on some servers."""
    try:
        fs.cat_file(path, start=0, end=1)
    except FileNotFoundError:
        return False
    except OSError:  # e.g. an empty object (no byte 0 to read): ask the slow way
        return fs.exists(path)
    return True


# --------------------------------------------------------------------------------------------
# The date lock
# --------------------------------------------------------------------------------------------


def _host_id() -> str:
    """This machine, and this boot of it: a pid is only meaningful within both."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[<inode>]``), or None where it cannot be read:
    containers sharing a hostname (host networking, ``--uts=host``, compose ``hostname:``)
    share the boot id too, yet a pid of one namespace says nothing in another."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field
    22), or None: tells a reused pid from the process that held a lock."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` of this host and PID namespace no longer runs (a zombie
    counts as gone, and so does a pid that now belongs to a process started later)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                return True
    except (OSError, IndexError):
        return False
    now = _start_time(pid)
    return started is not None and now is not None and now != started


def liveness_visible(info: dict) -> bool:
    """Whether this process can see if the holder described by lock document ``info`` runs:
    the same host, boot and PID namespace. Anywhere else only the heartbeat tells."""
    namespace = _pid_namespace()
    return (info.get("host") == _host_id() and namespace is not None
            and info.get("pid_ns") == namespace)


def _generation_name(generation: int) -> str:
    return f"{generation:010d}.json"


def lock_generations(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    """The generations of lock files in ``folder``, oldest first."""
    fs.invalidate_cache(folder)
    try:
        names = [p.rstrip("/").rpartition("/")[2] for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


@dataclass(frozen=True)
class LockToken:
    """What a run's commit needs to check that the run still holds its date's lock."""

    output: str
    run_date: str
    generation: int
    run_id: str

    def check(self) -> None:
        """Raise :class:`LockLost` when a newer generation of the lock exists."""
        fs, folder = output_fs(locks_dir(self.output, self.run_date))
        generations = lock_generations(fs, folder)
        newest = generations[-1] if generations else None
        if newest != self.generation:
            raise LockLost(
                f"Run {self.run_id} lost the lock of {self.run_date} in {self.output}: "
                f"generation {newest} replaced its generation {self.generation} (the lock was "
                "found stale). Its files are not committed; the other run's result stands.")


class DateLock:
    """The lock of one run date of one output root (see the module docstring).

    ``wait_s`` seconds are waited for a live holder to finish (0: refuse at once with
    :class:`LockHeld`); a holder that only collects dead runs' files
    (``purpose=COLLECT``, seconds) is always waited for, up to :data:`COLLECT_WAIT_S`.
    Use as a context manager or with :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, output: str, run_date: str, run_id: str, *, wait_s: float = 0.0,
                 ttl_s: float = DEFAULT_TTL_S, poll_s: float | None = None,
                 purpose: str = RUN) -> None:
        self.output, self.run_date, self.run_id = output, run_date, run_id
        self.wait_s, self.ttl_s, self.purpose = wait_s, ttl_s, purpose
        self.poll_s = poll_s if poll_s is not None else min(2.0, max(0.05, ttl_s / 20))
        self._fs, self._folder = output_fs(locks_dir(output, run_date))
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired_at = 0.0
        self._seen: dict[tuple[int, bytes], float] = {}

    # -- state of the current holder --------------------------------------------------------

    def _path(self, generation: int) -> str:
        return f"{self._folder}/{_generation_name(generation)}"

    def _read(self, generation: int) -> tuple[dict | None, bytes]:
        try:
            raw = self._fs.cat_file(self._path(generation))
        except FileNotFoundError:
            return None, b""
        try:
            return json.loads(raw), raw
        except ValueError:
            return None, raw

    def _holder(self, generation: int) -> tuple[str, dict | None]:
        """``("free" | "live" | "stale", lock document)`` of generation ``generation``."""
        info, raw = self._read(generation)
        now = time.time()
        first_seen = self._seen.setdefault((generation, raw), time.monotonic())
        unchanged_for = time.monotonic() - first_seen
        if info is None:
            # Missing (deleted meanwhile) or unreadable: stale once unchanged for a TTL.
            return ("stale" if not raw or unchanged_for > self.ttl_s else "live"), None
        if info.get("released"):
            return "free", info
        ttl = float(info.get("ttl_s") or self.ttl_s)
        if now - float(info.get("heartbeat_at", 0)) > ttl or unchanged_for > ttl:
            return "stale", info
        if liveness_visible(info) and _process_gone(int(info.get("pid", -1)),
                                                    info.get("pid_start")):
            return "stale", info
        return "live", info

    def _document(self, generation: int, *, released: bool = False) -> bytes:
        return json.dumps({
            "format": LOCK_FORMAT, "generation": generation, "run_id": self.run_id,
            "output": self.output, "run_date": self.run_date, "host": _host_id(),
            "pid": os.getpid(), "pid_ns": _pid_namespace(), "pid_start": _start_time(os.getpid()),
            "purpose": self.purpose, "acquired_at": self._acquired_at,
            "heartbeat_at": time.time(), "ttl_s": self.ttl_s, "released": released},
            indent=1).encode()

    def _held_message(self, info: dict | None, generation: int) -> str:
        who = "another run"
        if info:
            age = time.time() - float(info.get("heartbeat_at", 0))
            who = (f"run {info.get('run_id')!r} (host {str(info.get('host')).partition('/')[0]}, "
                   f"pid {info.get('pid')}, last heartbeat {age:.0f} s ago)")
        return (f"Run date {self.run_date} of {self.output} is locked by {who}, lock generation "
                f"{generation}: another run of this date is in progress. Let it finish, or wait "
                f"for it (lock_wait_s, now {self.wait_s:g} s). A lock whose run died is taken "
                f"over by the next run: at once on the same host and PID namespace, after "
                f"{self.ttl_s:.0f} s without heartbeat elsewhere.")

    # -- acquire, heartbeat, release ---------------------------------------------------------

    def acquire(self) -> LockToken:
        """Take the lock (the next generation), waiting up to ``wait_s`` for a live holder."""
        check_exclusive(self.output)
        started = time.monotonic()
        deadline = started + self.wait_s
        while True:
            generations = lock_generations(self._fs, self._folder)
            top = generations[-1] if generations else 0
            if top:
                state, info = self._holder(top)
                if state == "live":
                    collecting = (info or {}).get("purpose") == COLLECT
                    limit = max(deadline, started + COLLECT_WAIT_S) if collecting else deadline
                    if time.monotonic() >= limit:
                        raise LockHeld(self._held_message(info, top))
                    time.sleep(self.poll_s)
                    continue
                if state == "stale":
                    LOG.warning("Taking over the stale lock of %s (generation %d, run %s)",
                                self.run_date, top, (info or {}).get("run_id"))
            self._acquired_at = time.time()
            try:
                create_exclusive(self._fs, self._path(top + 1), self._document(top + 1))
            except FileExistsError:
                continue  # another run took this generation first: look again
            self._generation = top + 1
            for old in generations:  # released or stale: only the newest one matters
                try:
                    self._fs.rm_file(self._path(old))
                except FileNotFoundError:
                    pass
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"lock-heartbeat-{self.run_date}")
            self._thread.start()
            LOG.info("Locked %s of %s (generation %d)", self.run_date, self.output, top + 1)
            return self.token

    @property
    def token(self) -> LockToken:
        if self._generation is None:
            raise RuntimeError("the lock is not held")
        return LockToken(self.output, self.run_date, self._generation, self.run_id)

    def holds(self) -> bool:
        """Whether this run holds the lock now (acquired, and no newer generation)."""
        return self._generation is not None and self._still_mine()

    def _still_mine(self) -> bool:
        generations = lock_generations(self._fs, self._folder)
        return bool(generations) and generations[-1] == self._generation

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 10):
            try:
                if not self._still_mine():
                    LOG.error("The lock of %s was taken over by another run", self.run_date)
                    return
                replace_file(self._fs, self._path(self._generation), self._document(
                    self._generation))
            except Exception:  # noqa: BLE001 - a missed beat is retried; the TTL allows many
                LOG.warning("Lock heartbeat of %s failed", self.run_date, exc_info=True)

    def release(self) -> None:
        """Mark the lock released (when this run still holds it)."""
        if self._generation is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._still_mine():
                replace_file(self._fs, self._path(self._generation),
                             self._document(self._generation, released=True))
        finally:
            self._generation = None

    def __enter__(self) -> LockToken:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_state(output: str, run_date: str) -> str:
    """The state of a date's lock now, read without taking it: ``"free"`` (none, or
    released), ``"live"`` or ``"stale"``."""
    lock = DateLock(output, run_date, "(inspection)")
    generations = lock_generations(lock._fs, lock._folder)
    if not generations:
        return "free"
    return lock._holder(generations[-1])[0]
