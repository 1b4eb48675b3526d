"""The nightly run's pure parts and file edges: planning, filters, flags, drift, recovery."""
from __future__ import annotations

import datetime as dt
import os

import pandas as pd
import pytest

from pipeline.manifest import (ManifestRow, ManifestSchemaError, validate_manifest_schema,
                               write_manifest)
from pipeline.metrics import drift_report
from pipeline.nightly import (
    DRIFT,
    FEATURE_CACHE_DIR,
    GONE,
    NEW,
    OK,
    KnownReferences,
    NightQueries,
    committed_dates,
    date_queries,
    drift_markdown,
    drift_status,
    parse_nightly_args,
    plan_night,
    previous_date,
)
from transforms.write import recover_partitions

MODEL = "m@random|blocks=default|heads=none"


def rows(*specs) -> pd.DataFrame:
    """Existing partition rows from (image_id, seed) tuples, optionally + model_id and k."""
    full = [spec + (MODEL, 4)[len(spec) - 2:] for spec in specs]
    return pd.DataFrame(full, columns=["image_id", "seed", "model_id", "k"])


def plan(queries, existing, force=False, seeds=(0, 1)):
    return plan_night(queries, existing, model=MODEL, k=4, seeds=seeds, force=force)


# -- planning ----------------------------------------------------------------------------------

def test_first_night_scores_everything():
    p = plan(["a", "b"], rows())
    assert (p.queries, p.skip, p.to_score) == (2, frozenset(), 2)
    assert (p.carried_rows, p.dropped_rows) == (0, 0)
    assert not p.up_to_date


def test_queries_with_every_seed_are_skipped_and_carried():
    p = plan(["a", "b"], rows(("a", 0), ("a", 1), ("b", 0)))
    assert p.skip == {"a"}
    assert p.carry.tolist() == [True, True, False]  # b lacks seed 1: rescored, its row dropped
    assert (p.to_score, p.carried_rows, p.dropped_rows) == (1, 2, 1)


def test_everything_scored_is_up_to_date():
    p = plan(["a"], rows(("a", 0), ("a", 1)))
    assert p.up_to_date and p.to_score == 0


def test_other_model_or_k_counts_as_not_scored():
    p = plan(["a", "b"], rows(("a", 0, "other-model"), ("a", 1, "other-model"),
                              ("b", 0, MODEL, 2), ("b", 1, MODEL, 2)))
    assert p.skip == frozenset() and p.carried_rows == 0 and p.dropped_rows == 4


def test_rows_of_queries_gone_from_the_manifest_and_unasked_seeds_are_dropped():
    p = plan(["a"], rows(("a", 0), ("a", 1), ("a", 7), ("gone", 0), ("gone", 1)))
    assert p.skip == {"a"}
    assert p.carry.tolist() == [True, True, False, False, False]
    assert p.dropped_rows == 3 and not p.up_to_date


def test_duplicate_rows_are_carried_once():
    p = plan(["a"], rows(("a", 0), ("a", 0), ("a", 1)))
    assert p.carry.tolist() == [True, False, True]


def test_force_rescores_and_carries_nothing():
    p = plan(["a"], rows(("a", 0), ("a", 1)), force=True)
    assert p.skip == frozenset() and p.carried_rows == 0 and p.to_score == 1


# -- row filters -------------------------------------------------------------------------------

def mrow(image_id: str, role: str, capture_date: str | None) -> ManifestRow:
    return ManifestRow(image_uri=f"/d/{image_id}.png", dataset="ds", category="c", role=role,
                       label=0, image_id=image_id, defect_type=None, capture_date=capture_date)


def test_night_queries_are_that_dates_not_yet_scored():
    keep = NightQueries("2024-01-02", frozenset({"done"}))
    assert keep(mrow("q", "query", "2024-01-02"))
    assert not keep(mrow("done", "query", "2024-01-02"))
    assert not keep(mrow("q", "query", "2024-01-03"))
    assert not keep(mrow("q", "query", None))


def test_references_are_undated_or_captured_by_the_date():
    keep = KnownReferences("2024-01-02")
    assert keep(mrow("r", "reference", None))
    assert keep(mrow("r", "reference", "2024-01-02"))
    assert keep(mrow("r", "reference", "2023-12-31"))
    assert not keep(mrow("r", "reference", "2024-01-03"))


# -- flags -------------------------------------------------------------------------------------

def test_flags_give_the_date_partition_and_default_cache():
    config, options, beam_args = parse_nightly_args(
        ["--manifest", "m.parquet", "--output", "out/", "--date", "2024-01-02", "--force",
         "--alert-threshold", "0.7", "--runner=DirectRunner"])
    assert config.run_date == config.only_date == "2024-01-02"
    assert config.output == "out"
    assert config.feature_cache == f"out/{FEATURE_CACHE_DIR}"
    assert options.force and options.alert_threshold == 0.7 and not options.fail_on_drift
    assert beam_args == ["--runner=DirectRunner"]


def test_date_defaults_to_yesterday_utc():
    config, _, _ = parse_nightly_args(["--manifest", "m", "--output", "o"])
    yesterday = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
    assert config.run_date == yesterday.isoformat()


def test_cache_can_be_moved_or_turned_off():
    base = ["--manifest", "m", "--output", "o", "--date", "2024-01-02"]
    assert parse_nightly_args(base + ["--feature-cache", "c"])[0].feature_cache == "c"
    assert parse_nightly_args(base + ["--no-feature-cache"])[0].feature_cache is None


@pytest.mark.parametrize("bad", [
    ["--date", "2024-13-01"],
    ["--date", "2024-01-02", "--run-date", "2024-01-03"],
    ["--date", "2024-01-02", "--feature-cache", "c", "--no-feature-cache"],
    ["--date", "2024-01-02", "--alert-threshold", "nan"],
])
def test_bad_flags_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_nightly_args(["--manifest", "m", "--output", "o", *bad])


# -- drift -------------------------------------------------------------------------------------

def test_drift_status_per_dataset():
    today = pd.DataFrame({"dataset": ["same"] * 4 + ["moved"] * 4 + ["new"] * 2,
                          "final_score": [.1, .2, .3, .4, .8, .9, .9, .95, .1, .2]})
    before = pd.DataFrame({"dataset": ["same"] * 4 + ["moved"] * 4 + ["gone"] * 2,
                           "final_score": [.1, .2, .3, .41, .1, .2, .3, .4, .5, .6]})
    report = drift_status(drift_report(today, before, threshold=0.5), tolerance=0.1)
    status = dict(zip(report["dataset"], report["status"]))
    assert status == {"same": OK, "moved": DRIFT, "new": NEW, "gone": GONE}
    moved = report.set_index("dataset").loc["moved"]
    assert (moved["today_above_count"], moved["previous_above_count"]) == (4, 0)
    text = drift_markdown(report, "2024-01-03", "2024-01-02")
    assert "2024-01-03 vs 2024-01-02" in text
    assert all(f"| {d} | {s} |" in text for d, s in status.items())


def test_first_night_has_only_new_datasets():
    today = pd.DataFrame({"dataset": ["a"], "final_score": [0.2]})
    report = drift_status(drift_report(today, None, threshold=0.5), tolerance=0.1)
    assert report["status"].tolist() == [NEW]
    assert "no previous night" in drift_markdown(report, "2024-01-02", None)


# -- files -------------------------------------------------------------------------------------

def _touch(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("x")


def test_recover_restores_a_partition_retired_by_a_dead_commit(tmp_path):
    out = str(tmp_path)
    scores = tmp_path / "scores"
    _touch(scores / "dataset=a" / ".run_date=2024-01-02.old-r1" / "part-old.parquet")
    _touch(scores / "dataset=a" / ".run_date=2024-01-02.incoming-r2" / "part-new.parquet")
    _touch(scores / "dataset=b" / "run_date=2024-01-02" / "part-b.parquet")
    _touch(scores / "dataset=b" / ".run_date=2024-01-02.incoming-r2" / "part-new.parquet")
    _touch(scores / "dataset=b" / ".run_date=2024-01-03.old-r9" / "part-other-date.parquet")

    restored = recover_partitions(out, "scores", "2024-01-02")

    assert [p.rstrip("/").split("/")[-2] for p in restored] == ["dataset=a"]
    assert sorted(os.listdir(scores / "dataset=a")) == ["run_date=2024-01-02"]
    assert os.listdir(scores / "dataset=a" / "run_date=2024-01-02") == ["part-old.parquet"]
    assert sorted(os.listdir(scores / "dataset=b")) == [".run_date=2024-01-03.old-r9",
                                                        "run_date=2024-01-02"]
    assert recover_partitions(out, "missing-table", "2024-01-02") == []


def test_committed_and_previous_dates(tmp_path):
    for ds, date in (("a", "2024-01-01"), ("b", "2024-01-03"), ("a", "2024-01-05")):
        _touch(tmp_path / "scores" / f"dataset={ds}" / f"run_date={date}" / "_SUCCESS")
    _touch(tmp_path / "scores" / "dataset=a" / ".run_date=2024-01-04.incoming-x" / "_SUCCESS")
    out = str(tmp_path)
    assert committed_dates(out) == ["2024-01-01", "2024-01-03", "2024-01-05"]
    assert previous_date(out, "2024-01-05") == "2024-01-03"
    assert previous_date(out, "2024-01-04") == "2024-01-03"
    assert previous_date(out, "2024-01-01") is None
    assert committed_dates(str(tmp_path / "nothing")) == []


def test_date_queries_reads_timestamps_and_needs_the_column(tmp_path):
    frame = pd.DataFrame({
        "image_uri": ["/x/1.png", "/x/2.png", "/x/3.png", "/x/4.png"],
        "dataset": ["d"] * 4,
        "role": ["query", "query", "reference", "QUERY"],
        "capture_date": pd.to_datetime(["2024-01-02 23:59", "2024-01-03 00:01",
                                        "2024-01-02 08:00", "2024-01-02 01:00"]),
    })
    path = str(tmp_path / "m.parquet")
    write_manifest(frame, path)
    found = date_queries(path, validate_manifest_schema(path), "2024-01-02")
    assert sorted(found.values()) == ["d", "d"] and len(found) == 2

    undated = str(tmp_path / "undated.parquet")
    write_manifest(frame.drop(columns="capture_date"), undated)
    with pytest.raises(ManifestSchemaError, match="capture_date"):
        date_queries(undated, validate_manifest_schema(undated), "2024-01-02")
