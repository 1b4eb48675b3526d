"""What a newcomer sees: the demo command's whole console output, counted.

``./run_local.sh`` with no arguments is this command after its (silent, once) set-up.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.core.calibration import DEFAULT_FALSE_ALARM_RATE, min_calibration_size
from pipeline.core.schemas import SCORES
from tests.beamtest import read_table

MAX_LINES = 30


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("console")


@pytest.fixture(scope="module")
def demo_console(demo_workdir) -> list[str]:
    workdir = demo_workdir
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
    assert ("| dataset | k | scorer | AUROC | AUPRC | pixel AUROC | AUPRO | false alarms | "
            "recall |") in text  # the table
    assert "Summary:" in text and "Comparison:" in text and "Report:" in text
    # Beam's and open_clip's chatter stays out
    assert "Converting string literal type hint" not in text
    assert "BatchElements statistics" not in text
    assert "Parsing model identifier" not in text


def test_the_demo_ships_calibration_images_and_every_query_gets_a_decision(demo_console,
                                                                          demo_workdir):
    manifest = pd.read_parquet(demo_workdir / "manifest.parquet")
    queries = manifest[manifest["role"] == "query"]
    per_group = manifest[manifest["role"] == "calibration"].groupby(["dataset", "category"]).size()
    assert len(per_group) == manifest.groupby(["dataset", "category"]).ngroups
    assert (per_group >= min_calibration_size(DEFAULT_FALSE_ALARM_RATE)).all()
    scores = read_table(str(demo_workdir / "results"), SCORES)
    assert len(scores) == len(queries)  # one seed, one scorer; no calibration image
    assert scores["is_anomalous"].notna().all()
    assert (scores["calibration_size"] >= per_group.min()).all()
    # The progress line counts the queries, not the calibration images riding with them.
    assert any(f"{len(queries)}/{len(queries)} queries scored" in line for line in demo_console)
