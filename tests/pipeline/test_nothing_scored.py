"""Edge case: a manifest whose every query fails still completes with readable, empty outputs."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, SCORES, SUMMARY, scores_schema
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from tests.beamtest import counter, read_table

SEEDS = (0, 1)
RUN_DATE = "2024-03-08"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nothing")
    frame = pd.DataFrame([
        dict(image_uri=str(root / "missing.png"), dataset="d", category="c", role="query",
             label=1),
        dict(image_uri=str(root / "also_missing.png"), dataset="d", category="c", role="query",
             label=0),
    ])
    frame["label"] = frame["label"].astype("Int64")
    path = str(root / "manifest.parquet")
    write_manifest(frame, path)
    config = ScoreConfig(manifest=path, output=str(root / "out"), k=2, seeds=SEEDS,
                         backbone=tiny_spec(), run_date=RUN_DATE, run_id="nothing",
                         max_failed_fraction=1.0)  # every row fails; allowed to commit
    result = run_score(config, beam_args=[])
    return config, frame, result


def test_every_query_is_an_error_per_seed(run):
    config, frame, result = run
    errors = read_table(config.output, ERRORS)
    assert sorted(zip(errors.image_uri, errors.seed)) == sorted(
        (uri, s) for uri in frame.image_uri for s in SEEDS)
    assert (errors.stage == "read_image").all()
    assert counter(result, "queries_scored") == 0
    assert counter(result, "images_failed") == len(frame)


def test_empty_scores_table_keeps_its_columns(run):
    config, _, _ = run
    scores = pd.read_parquet(f"{config.output}/{SCORES}")
    assert scores.empty
    assert set(scores_schema(None, False).names) <= set(scores.columns)


def test_summary_is_written_empty(run):
    config, _, _ = run
    folder = f"{config.output}/{SUMMARY}/run_date={RUN_DATE}"
    with open(f"{folder}/summary.json") as f:
        document = json.load(f)
    assert document["records"] == []
    assert document["extra"]["run_id"] == "nothing"
    assert pd.read_parquet(f"{folder}/summary.parquet").empty


def test_a_manifest_without_queries_says_so_in_one_line(tmp_path, caplog):
    frame = pd.DataFrame([dict(image_uri=str(tmp_path / "ref.png"), dataset="d", category="c",
                               role="reference", label=0)])
    frame["label"] = frame["label"].astype("Int64")
    path = str(tmp_path / "manifest.parquet")
    write_manifest(frame, path)
    config = ScoreConfig(manifest=path, output=str(tmp_path / "out"), k=1,
                         backbone=tiny_spec(), run_date=RUN_DATE)
    with caplog.at_level("WARNING"):
        result = run_score(config)
    said = [r.getMessage() for r in caplog.records if "No query rows" in r.getMessage()]
    assert len(said) == 1 and path in said[0]
    assert counter(result, "queries_selected") == 0
