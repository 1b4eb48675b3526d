"""One failure is one error row (issue 22): a scorer that fails on one group's references, or
gives NaN, costs exactly the affected (query, seed, scorer) rows and the night commits; one
that fails everywhere is a systematic failure: no commit, the record in force stays, exit
status 5 naming the reason. Scorers are registered for the test, as any new one is."""
from __future__ import annotations

import glob
import json
import logging

import pandas as pd
import pytest

from pipeline.cli import main as cli_main
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.failures import EXIT_TOO_MANY_FAILURES, TooManyFailures
from pipeline.core.layout import current_record
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import tiny_spec
from pipeline.model.scorers import registry
from pipeline.model.scorers.base import CATEGORY, ScorerOutput
from pipeline.run import run_score
from tests.pipeline import toy_scorer

DATE = "2024-03-01"
BROKEN_CATEGORY = "washer"
SEEDS = (0, 1)


class _BrokenOnOneGroup(toy_scorer.MeanReference):
    """meanref, except that building the memory of one category's references raises."""

    def build_memory(self, references, context=None):
        if (context or {}).get(CATEGORY) == BROKEN_CATEGORY:
            raise ValueError(f"cannot model {BROKEN_CATEGORY}")
        return super().build_memory(references, context)


class _BrokenEverywhere(toy_scorer.MeanReference):
    def score(self, queries, memory) -> ScorerOutput:
        raise RuntimeError("scorer exploded")


class _NanOnAnomalies(toy_scorer.MeanReference):
    """meanref's score, NaN for the second query of every batch (a numerical blow-up)."""

    def score(self, queries, memory) -> ScorerOutput:
        out = super().score(queries, memory)
        score = out.score.clone()
        if len(score) > 1:
            score[1] = float("nan")
        return ScorerOutput(score=score, patch_map=None)


def _entry(name: str, cls) -> toy_scorer.MeanReferenceEntry:
    entry = toy_scorer.MeanReferenceEntry()
    entry.name = name
    entry.options = ()
    entry.build = lambda models: cls(1.0)
    return entry


@pytest.fixture
def scorers():
    entries = [toy_scorer.ENTRY, _entry("brokenone", _BrokenOnOneGroup), _entry("brokenall", _BrokenEverywhere),
               _entry("nanscore", _NanOnAnomalies)]
    for e in entries:
        registry.register(e)
    yield
    for e in entries:
        registry.unregister(e.name)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("demo")
    path = str(root / "manifest.parquet")
    pairs = generate_demo(str(root / "data"), seed=0, n_train=3, n_test_good=1,
                          n_test_defect_per_type=1)
    write_manifest(make_manifest(pairs).drop(columns=["mask_uri"]), path)
    return path


def _table(output: str, table: str) -> pd.DataFrame:
    files = glob.glob(f"{output}/{table}/**/*.parquet", recursive=True)
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _config(manifest: str, output: str, scorers: tuple[str, ...], run_id: str,
            **kw) -> ScoreConfig:
    return ScoreConfig(manifest=manifest, output=output, k=2, seeds=SEEDS, backbone=tiny_spec(),
                       scorers=scorers, run_date=DATE, run_id=run_id, batch_size=4, **kw)


def _queries(manifest: str) -> pd.DataFrame:
    return pd.read_parquet(manifest).query("role == 'query'")


def test_a_scorer_failing_on_one_group_fails_only_that_groups_rows(scorers, manifest, tmp_path):
    output = str(tmp_path / "out")
    queries = _queries(manifest)
    broken = queries[queries["category"] == BROKEN_CATEGORY]
    fraction = len(broken) / len(queries) / 2  # two scorers, one fails on that group
    assert 0.05 < fraction < 0.25  # above the default: the test sets the limit
    run_score(_config(manifest, output, ("brokenone", "meanref"), "partial",
                      max_failed_fraction=0.25), [])
    assert current_record(output, DATE).run_id == "partial"  # committed
    scores, errors = _table(output, "scores"), _table(output, "errors")
    ok = scores[scores["scorer"] == "brokenone"]
    assert set(ok["image_id"]) == set(queries["image_id"]) - set(broken["image_id"])
    assert len(scores[scores["scorer"] == "meanref"]) == len(queries) * len(SEEDS)
    failed = errors[errors["stage"] == "score"]
    assert sorted(zip(failed["image_id"], failed["seed"], failed["scorer"])) == sorted(
        (i, s, "brokenone") for i in broken["image_id"] for s in SEEDS)
    assert failed["reason"].str.startswith(f"ValueError: cannot model {BROKEN_CATEGORY}").all()
    with open(glob.glob(f"{output}/summary/run_date={DATE}/summary.json")[0]) as f:
        extra = json.load(f)["extra"]
    assert extra["failed_rows"] == len(broken) * len(SEEDS)
    assert extra["expected_rows"] == len(queries) * len(SEEDS) * 2
    report = open(glob.glob(f"{output}/report/run_date={DATE}/index.html")[0]).read()
    assert f"{len(broken) * len(SEEDS)} of {len(queries) * len(SEEDS) * 2}" in report


def test_nan_scores_are_error_rows(scorers, manifest, tmp_path):
    output = str(tmp_path / "out")
    run_score(_config(manifest, output, ("nanscore",), "nan", max_failed_fraction=1.0), [])
    scores, errors = _table(output, "scores"), _table(output, "errors")
    failed = errors[errors["stage"] == "score"]
    assert len(failed) > 0 and failed["reason"].str.contains("non-finite score nan").all()
    assert scores["final_score"].notna().all()
    expected = len(_queries(manifest)) * len(SEEDS)
    assert len(scores) + len(failed) == expected  # each row scored or failed, never both
    assert not set(zip(scores["image_id"], scores["seed"])) & set(
        zip(failed["image_id"], failed["seed"]))


def test_a_scorer_failing_everywhere_commits_nothing_and_exits_5(scorers, manifest, tmp_path,
                                                                  caplog):
    output = str(tmp_path / "out")
    run_score(_config(manifest, output, ("meanref",), "good"), [])
    before = current_record(output, DATE)
    scores_before = _table(output, "scores")
    with pytest.raises(TooManyFailures, match="scorer exploded"):
        run_score(_config(manifest, output, ("brokenall",), "bad"), [])
    argv = ["score", "--manifest", manifest, "--output", output, "--k", "2", "--seeds", "0",
            "--scorer", "brokenall", "--backbone", "InCTRL-Tiny-ViT-TESTONLY",
            "--pretrained", "random:0", "--run-date", DATE, "--run-id", "bad-cli"]
    with caplog.at_level(logging.ERROR):
        assert cli_main(argv) == EXIT_TOO_MANY_FAILURES
    assert "RuntimeError: scorer exploded" in caplog.text
    after = current_record(output, DATE)
    assert (after.version, after.run_id) == (before.version, "good")  # the record stays
    pd.testing.assert_frame_equal(_table(output, "scores"), scores_before)
    # the refused runs left nothing behind: no staging, no files of theirs
    assert not glob.glob(f"{output}/_staging/**/*.parquet", recursive=True)
    # and a limit of 1 lets the same run commit, every row an error row
    assert cli_main(argv + ["--max-failed-fraction", "1"]) == 0
    assert current_record(output, DATE).run_id == "bad-cli"
