"""The quiet console: which log lines show, and the progress line."""
from __future__ import annotations

import io
import logging

import pytest

from pipeline.core import console


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _emit():
    logging.getLogger("apache_beam.typehints.native_type_compatibility").info(
        "Converting string literal type hint to Any: \"dict\"")
    logging.getLogger("root").warning("apitools not found, and bigquery client libraries")
    logging.getLogger("pipeline.run").info("Scoring m → o")
    logging.getLogger("pipeline.core.locks").info("Locked 2024-01-01")
    logging.getLogger("pipeline.model.backbone").warning("Using a tiny random backbone")
    logging.getLogger("apache_beam.runners").error("a worker failed")


def test_quiet_console_keeps_headlines_and_warnings_that_matter(restore_logging):
    out = io.StringIO()
    console.configure_logging(verbose=False, stream=out)
    _emit()
    lines = out.getvalue().splitlines()
    assert lines == ["I Scoring m → o", "W Using a tiny random backbone", "E a worker failed"]


def test_verbose_console_keeps_everything(restore_logging):
    out = io.StringIO()
    console.configure_logging(verbose=True, stream=out)
    _emit()
    assert len(out.getvalue().splitlines()) == 6


def test_progress_line_counts_rate_and_time_left(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = console.Progress(100, stream=out, every_s=5.0)  # t=0
    progress.advance(10)  # t=10: first units, the rate starts here; 10 s since the start
    progress.advance(20)  # t=20: 20 more in 10 s
    assert out.getvalue().splitlines()[-1] == "30/100 queries scored · 2.0/s · 35 s left"
    progress.close()  # t=30
    assert out.getvalue().splitlines()[-1].startswith("30/100 queries scored · 1.0/s")


def test_advance_without_a_reporter_is_a_no_op():
    console.stop_progress()
    console.advance(5)  # a remote worker: nothing to report to
