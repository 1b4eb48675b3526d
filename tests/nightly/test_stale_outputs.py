"""Outputs that outlive what they describe (issue 21): a dataset removed from the manifest
leaves every table and the report, error rows without a dataset are replaced by a later
run, and a ``score`` rerun of a nightly date does not keep the night's drift, nightly
report or maps.

One module-scoped history on the DirectRunner with 16-pixel images and the tiny backbone:
night 1 (datasets alpha and beta, a manifest row without a dataset, maps), night 2 (alpha
alone, the bad row corrected away), night 3 (the same: up to date), then a ``score`` rerun
of the date without maps. Each step's record, files and report are kept for the tests.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.core.commit import KEPT_UP_TO_DATE
from pipeline.core.config import ScoreConfig
from pipeline.core.layout import (DRIFT, MAPS, NIGHTLY, Record, current_files, current_record,
                                  read_current, summary_dir)
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, SCORES, SUMMARY
from pipeline.model.backbone import tiny_spec
from pipeline.nightly.job import NightlyOptions, NightlyReport, run_nightly
from pipeline.run import run_score
from tests.storage.helpers import plain_pyarrow, rows

DATE = "2024-09-10"
ALPHA, BETA = "line-alpha", "line-beta"
COLS = ["dataset", "image_id", "run_id"]


def manifest(folder: str, datasets: list[str], *, bad_row: bool) -> str:
    """One reference and two queries of ``DATE`` per dataset (16-pixel random images); with
    ``bad_row`` also a query row without a dataset (a read_manifest error)."""
    rng = np.random.default_rng(1)
    rows_, name = [], "-".join(datasets) + ("-bad" if bad_row else "")
    os.makedirs(folder, exist_ok=True)
    for dataset in (ALPHA, BETA):
        for i in range(3):
            path = os.path.join(folder, f"{dataset}-{i}.png")
            if not os.path.exists(path):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            if dataset in datasets:
                rows_.append(dict(image_uri=path, dataset=dataset, category="c",
                                  role="reference" if i == 0 else "query", label=int(i == 2),
                                  image_id=f"{dataset}-{i}",
                                  capture_date="2024-01-01" if i == 0 else DATE))
    if bad_row:
        rows_.append(dict(image_uri=os.path.join(folder, f"{ALPHA}-1.png"), dataset=None,
                          category="c", role="query", label=0, image_id="no-dataset",
                          capture_date=DATE))
    path = os.path.join(folder, f"{name}.parquet")
    write_manifest(pd.DataFrame(rows_), path)
    return path


@dataclass
class Step:
    record: Record
    report: NightlyReport | None
    scores: pa.Table
    errors: pa.Table
    plain_scores: list[tuple]
    summary_files: list[str]
    summary: dict
    html: str
    maps: list[str]
    drift: dict | None


def step(out: str, report: NightlyReport | None) -> Step:
    with open(f"{out}/report/run_date={DATE}/index.html") as f:
        html = f.read()
    with open(f"{summary_dir(out, DATE)}/summary.json") as f:
        summary = json.load(f)
    record = current_record(out, DATE)
    drift = None
    for _, rel in record.files(DRIFT):
        if rel.endswith("drift.json"):
            with open(f"{out}/{rel}") as f:
                drift = json.load(f)
    return Step(record, report, read_current(out, SCORES),
                read_current(out, ERRORS), rows(plain_pyarrow(out, SCORES), COLS),
                sorted(os.listdir(summary_dir(out, DATE))), summary, html,
                list(current_files(out, MAPS, DATE)), drift)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    both = manifest(str(root / "images"), [ALPHA, BETA], bad_row=True)
    alpha = manifest(str(root / "images"), [ALPHA], bad_row=False)
    out = str(root / "out")
    base = ScoreConfig(manifest=both, output=out, k=1, seeds=(0,), backbone=tiny_spec(),
                       batch_size=4, run_date=DATE, write_anomaly_maps=True,
                       max_failed_fraction=1.0)  # the bad row fails on purpose
    steps = {}
    steps["night1"] = step(out, run_nightly(replace(base, run_id="night1"), []))
    steps["night2"] = step(out, run_nightly(replace(base, manifest=alpha, run_id="night2"),
                                            []))
    steps["night3"] = step(out, run_nightly(replace(base, manifest=alpha, run_id="night3"),
                                            [], NightlyOptions()))
    run_score(replace(base, manifest=alpha, run_id="score4", write_anomaly_maps=False))
    steps["score4"] = step(out, None)
    return {"out": out, "steps": steps}


def datasets(record: Record, table: str) -> set:
    return {p.dataset for p in record.partitions(table)}


def test_the_first_night_has_both_datasets_and_the_bad_row(history):
    first = history["steps"]["night1"]
    assert datasets(first.record, SCORES) == datasets(first.record, MAPS) == {ALPHA, BETA}
    assert None in datasets(first.record, ERRORS)  # the row without a dataset
    assert BETA in first.html and {r[0] for r in first.plain_scores} == {ALPHA, BETA}
    assert {r["dataset"] for r in first.drift["records"]} == {ALPHA, BETA}


def test_a_dataset_removed_from_the_manifest_leaves_every_table_and_the_report(history):
    second = history["steps"]["night2"]
    for table in (SCORES, ERRORS, MAPS):
        assert BETA not in datasets(second.record, table), table
    assert BETA not in set(second.scores["dataset"].to_pylist())
    assert not [m for m in second.maps if f"dataset={BETA}" in m]
    assert {r[0] for r in second.plain_scores} == {ALPHA}  # plain folder reads too
    assert {r["dataset"] for r in second.summary["records"]} == {ALPHA}
    assert {r["dataset"] for r in second.drift["records"]} == {ALPHA}
    assert BETA not in second.html
    assert second.report.dropped_rows == 2  # beta's two queries, one seed, one scorer


def test_a_row_without_a_dataset_is_replaced_by_a_later_run(history):
    second = history["steps"]["night2"]
    assert None not in datasets(second.record, ERRORS)
    assert "no-dataset" not in second.errors["image_id"].to_pylist()


def test_the_next_night_is_up_to_date_and_says_what_it_kept(history):
    third = history["steps"]["night3"]
    assert third.report.skipped and third.report.dropped_rows == 0
    assert rows(third.scores, COLS) == rows(history["steps"]["night2"].scores, COLS)
    kept = {(k.table, k.reason) for k in third.record.kept}
    assert (SUMMARY, KEPT_UP_TO_DATE) in kept
    assert {(t, r) for t, r in kept if t != SUMMARY} <= {
        (SCORES, "dataset not in this run"), (ERRORS, "dataset not in this run"),
        (MAPS, "dataset not in this run")}
    assert set(third.record.tables) >= {SCORES, SUMMARY, DRIFT, NIGHTLY}


def test_a_score_rerun_of_a_nightly_date_stands_for_itself(history):
    rerun = history["steps"]["score4"]
    # Its own tables only: no drift or nightly.json of another run, in the record, in the
    # published copies or in the report; no maps it did not write.
    assert set(rerun.record.tables) == {SCORES, ERRORS, SUMMARY}
    assert not [n for n in rerun.summary_files if n.startswith(("drift.", "nightly."))]
    assert 'id="drift"' not in rerun.html
    assert rerun.maps == [] and MAPS not in rerun.record.tables
    assert "anomaly_map_uri" not in rerun.scores.column_names
    assert {r[2] for r in rerun.plain_scores} == {"score4"}
    assert rerun.summary["extra"]["run_id"] == "score4"
    assert not os.path.exists(f"{history['out']}/{MAPS}/run_date={DATE}")
