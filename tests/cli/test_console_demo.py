"""What a newcomer sees: the demo command's whole console output, counted.

``./run_local.sh`` with no arguments is this command after its (silent, once) set-up.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

MAX_LINES = 30


@pytest.fixture(scope="module")
def demo_console(tmp_path_factory) -> list[str]:
    workdir = tmp_path_factory.mktemp("console")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--workdir", str(workdir),
                           "--seeds", "0"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stderr + done.stdout).splitlines()
    print(f"demo console: {len(lines)} lines\n" + "\n".join(lines))
    return lines


def test_the_demo_prints_at_most_thirty_lines(demo_console, record_property):
    record_property("console_lines", len(demo_console))
    assert len(demo_console) <= MAX_LINES, "\n".join(demo_console)


def test_the_lines_say_what_ran_and_where_the_results_are(demo_console):
    text = "\n".join(demo_console)
    assert "Scoring " in text and "scorers inctrl" in text  # what runs, with which model
    assert "tiny random test backbone" in text  # the warning that matters stays
    assert "queries scored" in text  # progress
    assert "| dataset | k | scorer | AUROC | AUPRC | pixel AUROC | AUPRO |" in text  # the table
    assert "Summary:" in text and "Comparison:" in text and "Report:" in text
    # Beam's and open_clip's chatter stays out
    assert "Converting string literal type hint" not in text
    assert "BatchElements statistics" not in text
    assert "Parsing model identifier" not in text
