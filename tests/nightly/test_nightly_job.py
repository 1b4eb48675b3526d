"""The nightly job end to end on the DirectRunner, night after night.

One module-scoped history runs the job as an operator would (first night, second night, a
rerun, a late query, an overlapping run refused, a crashed run, a forced rerun) and
snapshots the output after each step; the tests read the snapshots. Tiny backbone, 26 demo
images, about a minute in all.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import tiny_spec
from pipeline.core.layout import (DRIFT, FEATURE_CACHE_DIR, NIGHTLY, SUMMARY, current_record,
                                  summary_dir)
from pipeline.core.locks import DateLock, LockHeld
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.nightly.job import NightlyOptions, NightlyReport, run_nightly
import transforms.score

D1, D2 = "2024-01-02", "2024-01-03"
SEEDS = (0, 1)
KEY = ["image_id", "seed"]


def snapshot(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def partition_files(files: dict[str, bytes], date: str) -> dict[str, bytes]:
    """The committed files of ``date`` in the scores and errors tables of a snapshot."""
    return {path: data for path, data in files.items()
            if path.startswith(("scores/", "errors/")) and f"/run_date={date}/" in path}


def scores(files: dict[str, bytes], date: str) -> pd.DataFrame:
    """The scores rows of ``date`` in a snapshot, with their ``dataset``."""
    parts = []
    for path, data in sorted(files.items()):
        if (path.startswith("scores/") and f"/run_date={date}/" in path
                and path.endswith(".parquet")):
            frame = pq.read_table(pa.BufferReader(data)).to_pandas()
            frame["dataset"] = path.split("/")[1].partition("=")[2]
            parts.append(frame)
    return pd.concat(parts, ignore_index=True)


@dataclass
class Step:
    report: NightlyReport | None
    files: dict[str, bytes]
    error: Exception | None = None
    exit_code: int | None = None


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    pairs = generate_demo(str(root / "data"), image_size=32, n_train=2, n_test_good=1,
                          n_test_defect_per_type=1)
    manifest = make_manifest(pairs)
    queries = manifest.index[manifest["role"] == "query"]
    manifest["capture_date"] = None
    manifest.loc[queries, "capture_date"] = [D1 if i % 2 == 0 else D2 for i in range(len(queries))]
    manifest.loc[manifest["role"] == "reference", "capture_date"] = "2023-12-31"
    write_manifest(manifest, str(root / "manifest.parquet"))

    # A late query of D1: a copy of one of its images under a new name.
    late = manifest.loc[queries[0]].copy()
    late["image_uri"] = str(root / "late.png")
    late["image_id"] = "late-query"
    shutil.copy(manifest.loc[queries[0], "image_uri"], late["image_uri"])
    write_manifest(pd.concat([manifest, late.to_frame().T], ignore_index=True),
                   str(root / "manifest_late.parquet"))

    out = str(root / "out")
    base = ScoreConfig(manifest=str(root / "manifest.parquet"), output=out, k=2, seeds=SEEDS,
                       backbone=tiny_spec(), batch_size=4,
                       feature_cache=f"{out}/{FEATURE_CACHE_DIR}")

    def night(date: str, run_id: str, manifest_name: str = "manifest.parquet",
              force: bool = False) -> Step:
        config = replace(base, manifest=str(root / manifest_name), run_date=date,
                         run_id=run_id)
        try:
            report = run_nightly(config, [], NightlyOptions(force=force))
        except Exception as exc:  # the crash step keeps going to look at the output
            return Step(None, snapshot(out), exc)
        return Step(report, snapshot(out))

    steps = {"night1": night(D1, "night1")}
    # The second night goes through the command line, as cron would run it, at the first
    # night's precision (the CPU default is bf16 where the CPU has it: another identity,
    # whose features the cache rightly does not hold).
    code = cli_main(["nightly", "--manifest", str(root / "manifest.parquet"), "--output", out,
                     "--date", D2, "--k", "2", "--seeds", "0,1", "--batch-size", "4",
                     "--run-id", "night2", "--backbone", "InCTRL-Tiny-ViT-TESTONLY",
                     "--pretrained", "random:0", "--precision", base.backbone.precision])
    with open(f"{out}/summary/run_date={D2}/nightly.json") as f:
        steps["night2"] = Step(NightlyReport(**json.load(f)), snapshot(out), exit_code=code)
    steps["rerun1"] = night(D1, "rerun1")
    steps["late1"] = night(D1, "late1", "manifest_late.parquet")

    def broken(self, *args, **kwargs):
        raise RuntimeError("scoring crashed")

    # An overlapping run of the same date (a cron firing while a manual rerun goes on).
    with DateLock(out, D1, "manual-rerun"):
        steps["locked1"] = night(D1, "locked1", "manifest_late.parquet", force=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transforms.score._ScoreFn, "process", broken)
        steps["crash1"] = night(D1, "crash1", "manifest_late.parquet", force=True)
    steps["force1"] = night(D1, "force1", "manifest_late.parquet", force=True)
    return {"root": root, "out": out, "manifest": manifest, "steps": steps}


def d1_queries(history) -> set[str]:
    m = history["manifest"]
    return set(m.loc[(m["role"] == "query") & (m["capture_date"] == D1), "image_id"])


def test_a_night_scores_the_queries_of_its_date(history):
    first = history["steps"]["night1"]
    assert first.report.queries_on_date == len(d1_queries(history)) == 8
    assert first.report.scored_queries == 8 and not first.report.skipped
    rows = scores(first.files, D1)
    assert set(rows["image_id"]) == d1_queries(history)
    assert len(rows) == 8 * len(SEEDS) and not rows.duplicated(KEY).any()
    assert set(rows["capture_date"]) == {D1}
    assert any(p.endswith("/_SUCCESS") for p in first.files if p.startswith("scores/"))


def test_unchanged_references_are_not_extracted_again(history):
    first, second = history["steps"]["night1"].report, history["steps"]["night2"].report
    # 5 categories x k=2 references, drawn by both seeds: 10 distinct images.
    assert (first.reference_features_extracted, first.reference_cache_misses) == (10, 10)
    assert first.reference_cache_hits == 0
    assert (second.reference_features_extracted, second.reference_cache_misses) == (0, 0)
    assert second.reference_cache_hits == 10
    assert second.query_features_extracted == 8


def test_the_command_line_night_and_its_drift_report(history):
    step = history["steps"]["night2"]
    assert step.exit_code == 0
    assert step.report.previous_date == D1
    summary = f"summary/run_date={D2}/"
    assert {summary + n for n in ("summary.json", "summary.md", "drift.parquet", "drift.json",
                                  "drift.md", "nightly.json")} <= set(step.files)
    assert {k: v.rpartition("/")[2] for k, v in step.report.files.items()} == {
        "report": "nightly.json", "parquet": "drift.parquet", "json": "drift.json",
        "markdown": "drift.md"}
    drift = json.loads(step.files[summary + "drift.json"])
    assert drift["extra"]["previous_date"] == D1 and drift["extra"]["threshold"] is None
    assert drift["extra"]["false_alarm_rate"] == 0.05
    records = {r["dataset"]: r for r in drift["records"]}
    assert set(records) == {"industrial_objects", "industrial_textures", "medical_scans"}
    today, before = scores(step.files, D2), history["steps"]["night1"]
    for dataset, r in records.items():
        mine = today[today["dataset"] == dataset]
        assert r["today_count"] == len(mine)
        # Alerts count decisions (none here: no calibration image), not raw scores.
        assert r["today_decided_count"] == int(mine["is_anomalous"].notna().sum())
        assert r["today_flagged_count"] == int((mine["is_anomalous"] == True).sum())  # noqa: E712
        assert r["today_above_count"] is None
        assert r["status"] in ("ok", "drift")
    assert "| dataset | status |" in step.files[summary + "drift.md"].decode()
    # The first night had nothing to compare with.
    first = json.loads(before.files[f"summary/run_date={D1}/drift.json"])
    assert {r["status"] for r in first["records"]} == {"new"}


def test_rerunning_a_scored_date_changes_nothing(history):
    steps = history["steps"]
    rerun = steps["rerun1"]
    assert rerun.report.skipped and rerun.report.scored_queries == 0
    assert rerun.report.already_scored == 8
    for date in (D1, D2):
        assert partition_files(rerun.files, date) == partition_files(steps["night2"].files, date)


def test_a_late_query_is_scored_alone_and_merged(history):
    steps = history["steps"]
    late = steps["late1"].report
    assert (late.queries_on_date, late.already_scored, late.scored_queries) == (9, 8, 1)
    assert late.carried_rows == 16 and late.dropped_rows == 0
    assert late.query_features_extracted == 1 and late.reference_features_extracted == 0
    rows = scores(steps["late1"].files, D1)
    assert len(rows) == 9 * len(SEEDS) and not rows.duplicated(KEY).any()
    assert set(rows.loc[rows["image_id"] == "late-query", "run_id"]) == {"late1"}
    # The carried rows are the first night's, unchanged.
    first = scores(steps["night1"].files, D1).set_index(KEY).sort_index()
    carried = rows[rows["image_id"] != "late-query"].set_index(KEY).sort_index()
    pd.testing.assert_frame_equal(carried[first.columns], first)
    # The other date was not touched.
    assert partition_files(steps["late1"].files, D2) == partition_files(steps["night2"].files, D2)
    summary = json.loads(steps["late1"].files[f"summary/run_date={D1}/summary.json"])
    pooled = [r for r in summary["records"] if r["level"] == "dataset_pooled"]
    assert sum(r["query_count"] for r in pooled) == 9  # carried rows are summarised too


def test_a_crashed_run_leaves_the_previous_partitions(history):
    steps = history["steps"]
    crash = steps["crash1"]
    assert isinstance(crash.error, Exception) and "scoring crashed" in str(crash.error)
    before = {p: d for p, d in steps["late1"].files.items()
              if p.startswith(("scores/", "errors/"))}
    after = {p: d for p, d in crash.files.items() if p.startswith(("scores/", "errors/"))}
    assert after == before  # both dates, byte for byte
    assert not any(p.startswith("_staging/") for p in crash.files)
    assert not [p for p in crash.files if "/.run_date=" in p]


def test_force_rescores_every_query_once(history):
    force = history["steps"]["force1"].report
    assert (force.scored_queries, force.already_scored, force.carried_rows) == (9, 0, 0)
    assert force.dropped_rows == 18 and force.forced
    files = history["steps"]["force1"].files
    rows = scores(files, D1)
    assert len(rows) == 18 and not rows.duplicated(KEY).any()
    assert set(rows["run_id"]) == {"force1"}
    assert len(scores(files, D2)) == 16
    assert not os.path.exists(os.path.join(history["out"], "_staging"))


def tables(files: dict[str, bytes]) -> dict[str, bytes]:
    """A snapshot's tables and records, without the lock files."""
    return {p: d for p, d in files.items() if not p.startswith("_locks/")}


def test_a_night_commits_all_its_tables_with_one_record(history):
    out = history["out"]
    record = current_record(out, D2)  # night2 was the last run of D2
    assert record.run_id == "night2"
    for table in (SCORES, ERRORS):
        assert {p.run_id for p in record.partitions(table)} == {"night2"}
        assert {p.dataset for p in record.partitions(table)} == {
            "industrial_objects", "industrial_textures", "medical_scans"}
    for report in (SUMMARY, DRIFT, NIGHTLY):
        (part,) = record.partitions(report)
        assert part.run_id == "night2"
        for path in part.files:  # the published copies are the committed files
            name = path.rpartition("/")[2]
            with open(f"{out}/{path}", "rb") as a, open(f"{summary_dir(out, D2)}/{name}",
                                                           "rb") as b:
                assert a.read() == b.read()


def test_an_overlapping_run_of_the_date_is_refused_and_changes_nothing(history):
    steps = history["steps"]
    locked = steps["locked1"]
    assert isinstance(locked.error, LockHeld)
    assert f"Run date {D1}" in str(locked.error)
    assert "locked by run 'manual-rerun'" in str(locked.error)
    assert tables(locked.files) == tables(steps["late1"].files)
