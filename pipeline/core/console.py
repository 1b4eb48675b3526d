"""What a person at the console sees: our own few lines, warnings that matter, progress.

``configure_logging(verbose=False)`` keeps the job's own headline loggers at INFO (what
runs, with which model, what was committed), every other logger (Beam's type-hint
conversions and batching statistics, open_clip's model-config parsing) at WARNING, and
drops two known warnings that say nothing to a user (Beam's missing GCP client libraries,
open_clip's "no pretrained weights" for the tiny test backbone, which our own warning
already explains). ``verbose=True`` is the full INFO log.

``Progress`` is a progress line for runs in this process (the local runners): queries
scored of the total, images per second and time left, on one rewritten line on a terminal,
else a line every ``every_s`` seconds. Workers of remote runners have no reporter; their
progress is in the runner's metrics (``inctrl/queries_scored``).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import TextIO

#: Loggers whose INFO lines a quiet console keeps: the run's headline, not its details.
HEADLINE_LOGGERS = ("pipeline.run", "pipeline.core.commit", "pipeline.core.demo_data",
                    "pipeline.nightly.job", "pipeline.cli",
                    "pipeline.train_job", "pipeline.core.console")
#: Known warnings that are noise to a user (substrings of the message).
_NOISE = ("apitools not found",
          "No pretrained weights loaded for model 'InCTRL-Tiny-ViT-TESTONLY'")

LOG = logging.getLogger(__name__)


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        name = record.name
        if record.levelno >= logging.WARNING:
            return not any(n in record.getMessage() for n in _NOISE)
        return any(name == h or name.startswith(h + ".") for h in HEADLINE_LOGGERS)


def configure_logging(verbose: bool = False, stream: TextIO | None = None) -> None:
    """Set up the root logger for a command: quiet (default) or the full INFO log."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._inctrl_console = True  # replaced by the next call, other handlers are kept
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_inctrl_console", False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return
    handler.setFormatter(logging.Formatter("%(levelname).1s %(message)s"))
    handler.addFilter(_QuietFilter())


class Progress:
    """Counts units done against a total and reports them at most every ``every_s``."""

    def __init__(self, total: int | None, label: str = "queries scored",
                 stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self._stream = stream or sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = 0.5 if self._tty else every_s
        self._start = time.monotonic()
        self._last = self._start
        self._lock = threading.Lock()
        self._shown = False
        self._first: tuple[float, int] | None = None  # (time, units) of the first advance

    def line(self, now: float | None = None) -> str:
        """``120/300 queries scored · 45.1/s · 4 s left``: the rate since the first units
        were counted (start-up and model loading are not in it)."""
        if self._first is None:
            rate = 0.0
        else:
            first_t, first_n = self._first
            elapsed = (now or time.monotonic()) - first_t
            rate = (self.done - first_n) / elapsed if elapsed > 0 else 0.0
        text = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text += f" {self.label}"
        if rate > 0:
            text += f" · {rate:.1f}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f" · {(self.total - self.done) / rate:.0f} s left"
        return text

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self._first is None:
                self._first = (now, self.done)
            if now - self._last < self._every:
                return
            self._last = now
            self._write(self.line(now))

    def _write(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r" + text.ljust(70))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        """The final line, when anything was counted."""
        with self._lock:
            if self.done or self._shown:
                self._write(self.line())
                if self._tty:
                    self._stream.write("\n")
                    self._stream.flush()


_CURRENT: Progress | None = None


def start_progress(total: int | None, label: str = "queries scored") -> Progress:
    """Make a reporter current for this process; the scoring DoFn advances it."""
    global _CURRENT
    _CURRENT = Progress(total, label)
    return _CURRENT


def stop_progress() -> None:
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
    _CURRENT = None


def advance(n: int) -> None:
    """Count ``n`` units on the current reporter, if this process has one (local runs)."""
    current = _CURRENT
    if current is not None:
        current.advance(n)
