"""The nightly run's plan and its edges: planning, the date's queries, flags."""
from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.cli.nightly import parse_nightly_args
from pipeline.core.layout import FEATURE_CACHE_DIR
from pipeline.core.manifest import ManifestSchemaError, validate_manifest_schema, write_manifest
from pipeline.nightly.plan import date_queries, plan_night

MODEL = "m@random|blocks=default|heads=none"


DS = "ds"


def rows(*specs, dataset: str = DS) -> pd.DataFrame:
    """Existing partition rows from (image_id, seed) tuples, optionally + model_id and k."""
    full = [(dataset,) + spec + (MODEL, 4)[len(spec) - 2:] for spec in specs]
    return pd.DataFrame(full, columns=["dataset", "image_id", "seed", "model_id", "k"])


def plan(queries, existing, force=False, seeds=(0, 1)):
    """Plan image ids of dataset ``ds`` (pairs pass through)."""
    pairs = [q if isinstance(q, tuple) else (DS, q) for q in queries]
    return plan_night(pairs, existing, model_ids={"inctrl": MODEL}, k=4, seeds=seeds,
                      force=force)


# -- planning ----------------------------------------------------------------------------------

def test_first_night_scores_everything():
    p = plan(["a", "b"], rows())
    assert (p.queries, p.skip, p.to_score) == (2, frozenset(), 2)
    assert (p.carried_rows, p.dropped_rows) == (0, 0)
    assert not p.up_to_date


def test_queries_with_every_seed_are_skipped_and_carried():
    p = plan(["a", "b"], rows(("a", 0), ("a", 1), ("b", 0)))
    assert p.skip == {(DS, "a")}
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
    assert p.skip == {(DS, "a")}
    assert p.carry.tolist() == [True, True, False, False, False]
    assert p.dropped_rows == 3 and not p.up_to_date


def test_duplicate_rows_are_carried_once():
    p = plan(["a"], rows(("a", 0), ("a", 0), ("a", 1)))
    assert p.carry.tolist() == [True, False, True]


def test_one_image_queried_in_two_datasets_is_planned_per_dataset():
    """Scored for line-a only: line-b's query of the same image is not done."""
    existing = rows(("a", 0), ("a", 1), dataset="line-a")
    p = plan([("line-a", "a"), ("line-b", "a")], existing)
    assert p.skip == {("line-a", "a")} and p.to_score == 1
    assert p.carry.tolist() == [True, True]


def test_rows_decided_at_another_false_alarm_rate_or_none_are_scored_again():
    existing = rows(("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)).assign(
        false_alarm_rate=[0.05, 0.05, 0.01, 0.01, None, None])
    p = plan_night([(DS, q) for q in "abc"], existing, model_ids={"inctrl": MODEL}, k=4,
                   seeds=(0, 1), false_alarm_rate=0.05)
    assert p.skip == {(DS, "a")} and p.carry.tolist() == [True, True] + [False] * 4
    # Rows written before decisions existed have no such column: none counts.
    old = plan_night([(DS, "a")], rows(("a", 0), ("a", 1)), model_ids={"inctrl": MODEL}, k=4,
                     seeds=(0, 1), false_alarm_rate=0.05)
    assert old.skip == frozenset() and old.dropped_rows == 2


def test_force_rescores_and_carries_nothing():
    p = plan(["a"], rows(("a", 0), ("a", 1)), force=True)
    assert p.skip == frozenset() and p.carried_rows == 0 and p.to_score == 1


# -- flags -------------------------------------------------------------------------------------

def test_flags_give_the_date_partition_and_default_cache():
    config, options, beam_args = parse_nightly_args(
        ["--manifest", "m.parquet", "--output", "out/", "--date", "2024-01-02", "--force",
         "--alert-threshold", "0.7", "--runner=DirectRunner"])
    assert config.run_date == "2024-01-02"
    assert config.output == "out"
    assert config.feature_cache == f"out/{FEATURE_CACHE_DIR}"
    assert options.force and options.alert_threshold == 0.7 and not options.fail_on_drift
    assert beam_args == ["--runner=DirectRunner"]
    assert config.false_alarm_rate == 0.05


def test_alert_threshold_is_deprecated_with_a_warning(caplog):
    base = ["--manifest", "m", "--output", "o", "--date", "2024-01-02"]
    with caplog.at_level("WARNING"):
        config, options, _ = parse_nightly_args(base + ["--false-alarm-rate", "0.01"])
    assert options.alert_threshold is None and config.false_alarm_rate == 0.01
    assert "deprecated" not in caplog.text
    with caplog.at_level("WARNING"):
        _, options, _ = parse_nightly_args(base + ["--alert-threshold", "0.7"])
    assert options.alert_threshold == 0.7
    assert "--alert-threshold is deprecated" in caplog.text and "anomaly rate" in caplog.text


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
    ["--date", "2024-01-02", "--false-alarm-rate", "0"],
    ["--date", "2024-01-02", "--false-alarm-rate", "1"],
])
def test_bad_flags_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_nightly_args(["--manifest", "m", "--output", "o", *bad])


# -- files -------------------------------------------------------------------------------------

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
    assert sorted(d for d, _ in found) == ["d", "d"] and len(found) == 2

    undated = str(tmp_path / "undated.parquet")
    write_manifest(frame.drop(columns="capture_date"), undated)
    with pytest.raises(ManifestSchemaError, match="capture_date"):
        date_queries(undated, validate_manifest_schema(undated), "2024-01-02")


def test_a_query_is_done_only_with_every_seed_and_scorer_of_the_run():
    cnn = "patchcore|cnn|wrn|W1"
    existing = pd.DataFrame(
        [(DS, "a", seed, MODEL if scorer == "inctrl" else cnn, 4, scorer)
         for seed in (0, 1) for scorer in ("inctrl", "patchcore")]
        + [(DS, "b", seed, MODEL, 4, "inctrl") for seed in (0, 1)]
        + [(DS, "c", seed, MODEL if scorer == "inctrl" else "patchcore|cnn|wrn|OLD", 4, scorer)
           for seed in (0, 1) for scorer in ("inctrl", "patchcore")],
        columns=["dataset", "image_id", "seed", "model_id", "k", "scorer"])
    model_ids = {"inctrl": MODEL, "patchcore": cnn}
    p = plan_night([(DS, "a"), (DS, "b"), (DS, "c")], existing, model_ids=model_ids, k=4,
                   seeds=(0, 1))
    # b lacks patchcore; c's patchcore rows come from another model (other CNN weights)
    assert p.skip == {(DS, "a")}
    assert p.carried_rows == 4
    # rows without a scorer column count as InCTRL's
    legacy = rows(("a", 0), ("a", 1))
    assert plan_night([(DS, "a")], legacy, model_ids={"inctrl": MODEL}, k=4,
                      seeds=(0, 1)).up_to_date
    assert not plan_night([(DS, "a")], legacy, model_ids=model_ids, k=4,
                          seeds=(0, 1)).up_to_date
