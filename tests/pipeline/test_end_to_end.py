"""The whole scoring job on a small synthetic demo set with the tiny test backbone.

One run (and one rerun) per module; the tests read what they wrote.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import normalize_row, write_manifest
from pipeline.core.sampling import draw_references
from pipeline.core.schemas import ERROR_SCHEMA, ERRORS, SCORES, SUMMARY, scores_schema
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from tests.beamtest import Run, counter, pool_calibration, read_table
from transforms.write import SUCCESS_MARKER

K = 2
SEEDS = (0, 1)
RUN_DATE = "2024-03-05"
SCORE_COLUMNS = ["final_score", "fine_score", "holistic_score", "image_residual_score",
                 "text_prior_score"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    root = tmp_path_factory.mktemp("demo")
    roots = generate_demo(str(root / "data"), image_size=32, n_train=4, n_test_good=2,
                          n_test_defect_per_type=1)
    frame = make_manifest(roots)
    path = str(root / "manifest.parquet")
    write_manifest(frame, path)
    return path, frame


def _run(manifest, output: str, run_id: str) -> Run:
    path, frame = manifest
    config = ScoreConfig(manifest=path, output=output, k=K, seeds=SEEDS, backbone=tiny_spec(),
                         run_date=RUN_DATE, run_id=run_id, batch_size=4)
    result = run_score(config, beam_args=[])
    return Run(config, frame, result, read_table(output, SCORES), read_table(output, ERRORS))


@pytest.fixture(scope="module")
def run(manifest, tmp_path_factory) -> Run:
    return _run(manifest, str(tmp_path_factory.mktemp("out")), "e2e-first")


@pytest.fixture(scope="module")
def rerun(manifest, tmp_path_factory, run) -> Run:
    return _run(manifest, str(tmp_path_factory.mktemp("out_again")), "e2e-second")


def _queries(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.role == "query"]


def test_scores_schema(run):
    schema = pads.dataset(f"{run.config.output}/{SCORES}", format="parquet",
                          partitioning="hive").schema
    expected = scores_schema(pa.Schema.from_pandas(run.manifest, preserve_index=False), False)
    # Every file holds exactly the declared columns; hive adds the partition columns.
    assert list(schema) == list(expected) + [pa.field("dataset", pa.string()),
                                             pa.field("run_date", pa.string())]
    for path in _files(run, SCORES, ".parquet"):
        assert pq.read_schema(path).remove_metadata() == expected


def test_errors_schema_without_errors(run):
    # A clean run writes no error rows, yet the errors table still reads with its columns.
    assert run.errors.empty
    schema = pads.dataset(f"{run.config.output}/{ERRORS}", format="parquet",
                          partitioning="hive").schema
    assert list(schema) == list(ERROR_SCHEMA) + [pa.field("dataset", pa.string()),
                                                 pa.field("run_date", pa.string())]
    frame = pd.read_parquet(f"{run.config.output}/{ERRORS}")
    assert frame.empty and {"stage", "reason", "seed"} <= set(frame.columns)


def _files(run: Run, table: str, suffix: str) -> list[str]:
    root = f"{run.config.output}/{table}"
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                  if n.endswith(suffix))


def test_hive_layout_and_success_markers(run):
    datasets = sorted(_queries(run.manifest).dataset.unique())
    assert len(datasets) >= 3
    for table in (SCORES, ERRORS):
        root = f"{run.config.output}/{table}"
        assert sorted(os.listdir(root)) == [f"dataset={d}" for d in datasets]
        for d in datasets:
            assert os.listdir(f"{root}/dataset={d}") == [f"run_date={RUN_DATE}"]
            assert os.path.isfile(f"{root}/dataset={d}/run_date={RUN_DATE}/{SUCCESS_MARKER}")
    for path in _files(run, SCORES, ".parquet"):
        dataset = path.split("/dataset=")[1].split("/")[0]
        assert set(pq.read_table(path).column("image_uri").to_pylist()) <= set(
            run.manifest[run.manifest.dataset == dataset].image_uri)


def test_pandas_reads_the_same_rows_as_pyarrow(run):
    frame = pd.read_parquet(f"{run.config.output}/{SCORES}")
    assert len(frame) == len(run.scores)
    assert sorted(frame["dataset"].astype(str).unique()) == sorted(run.scores.dataset.unique())
    assert set(frame["run_date"].astype(str)) == {RUN_DATE}
    merged = frame.assign(dataset=frame.dataset.astype(str)).merge(
        run.scores, on=["image_id", "seed"], suffixes=("", "_pa"))
    assert len(merged) == len(frame)
    assert (merged.dataset == merged.dataset_pa).all()
    np.testing.assert_array_equal(merged.final_score, merged.final_score_pa)


def test_duckdb_reads_the_hive_partitions(run):
    import duckdb  # a test dependency (setup.py extras "test")
    pattern = f"{run.config.output}/{SCORES}/*/*/*.parquet"
    frame = duckdb.sql(
        f"SELECT image_id, seed, dataset, CAST(run_date AS VARCHAR) AS run_date, final_score "
        f"FROM read_parquet('{pattern}', hive_partitioning = true)").df()
    assert len(frame) == len(run.scores)
    assert set(frame.run_date) == {RUN_DATE}
    merged = frame.merge(run.scores, on=["image_id", "seed"], suffixes=("", "_pa"))
    assert len(merged) == len(frame) and (merged.dataset == merged.dataset_pa).all()
    np.testing.assert_array_equal(merged.final_score, merged.final_score_pa)


def test_every_query_reconciles_once_per_seed(run):
    queries = _queries(run.manifest)
    assert run.errors.empty
    seen = run.scores.groupby(["image_id", "seed"]).size()
    assert (seen == 1).all()
    expected = {(i, s) for i in queries.image_id for s in SEEDS}
    assert set(seen.index) == expected
    assert not set(run.scores.image_id) & set(run.manifest[run.manifest.role != "query"].image_id)


def test_scores_carry_the_query_row(run):
    rows = run.manifest.set_index("image_id")
    for rec in run.scores.itertuples():
        src = rows.loc[rec.image_id]
        assert (rec.image_uri, rec.dataset, rec.category, rec.label) == (
            src.image_uri, src.dataset, src.category, src.label)
    assert np.isfinite(run.scores.final_score).all()
    assert run.scores.final_score.between(0, 1).all()


def test_model_identity_in_every_row(run):
    assert run.scores.model_id.str.contains("TESTONLY").all()
    assert (run.scores.backbone == tiny_spec().name).all()
    assert (run.scores.run_id == "e2e-first").all()
    assert (run.scores.scoring_mode == "training-free").all()
    assert (run.scores.heads_hash == "none").all()


def test_references_are_exactly_the_seeded_draw(run):
    refs = [normalize_row(r) for r in run.manifest[run.manifest.role == "reference"].to_dict(
        "records")]
    assert (run.scores.k == K).all() and (run.scores.k_used == K).all()
    draws = {}
    for rec in run.scores.itertuples():
        group = [r for r in refs if (r.dataset, r.category) == (rec.dataset, rec.category)]
        assert len(group) > K
        drawn = draw_references(group, rec.seed, K)
        expected = [r.image_id for r in drawn]
        assert list(rec.reference_ids) == expected
        assert list(rec.reference_uris) == [r.image_uri for r in drawn]
        draws.setdefault((rec.dataset, rec.category), {})[rec.seed] = tuple(expected)
    # The seeds matter: some group draws a different set for another seed.
    assert any(len(set(by_seed.values())) > 1 for by_seed in draws.values())


def test_summary_auroc_equals_sklearn_on_written_scores(run):
    folder = f"{run.config.output}/{SUMMARY}/run_date={RUN_DATE}"
    summary = pd.read_parquet(f"{folder}/summary.parquet")
    categories = summary[summary.level == "category"].set_index(["dataset", "category"])
    groups = run.scores.groupby(["dataset", "category"])
    assert set(categories.index) == set(groups.groups)
    for (dataset, category), group in groups:
        per_seed = [roc_auc_score(g.label, g.final_score) for _, g in group.groupby("seed")]
        assert len(per_seed) == len(SEEDS)
        row = categories.loc[(dataset, category)]
        assert row.auroc_mean == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert row.auroc_std == pytest.approx(np.std(per_seed), abs=1e-12)
        assert (row.k, row.n_seeds, row.query_count) == (K, len(SEEDS), len(group) // len(SEEDS))


def test_summary_files(run):
    folder = f"{run.config.output}/{SUMMARY}/run_date={RUN_DATE}"
    assert sorted(os.listdir(folder)) == ["comparison.json", "comparison.md",
                                          "comparison.parquet", "summary.json", "summary.md",
                                          "summary.parquet"]
    with open(f"{folder}/summary.json") as f:
        document = json.load(f)
    assert document["extra"]["run_id"] == "e2e-first"
    assert "TESTONLY" in document["extra"]["model_ids"]["inctrl"]
    assert document["extra"]["seeds"] == list(SEEDS)
    assert len(document["records"]) == len(pd.read_parquet(f"{folder}/summary.parquet"))
    with open(f"{folder}/summary.md") as f:
        markdown = f.read()
    for category in run.scores.category.unique():
        assert f"| {category} |" in markdown


def test_rerun_gives_identical_scores(run, rerun):
    key = ["image_id", "seed"]
    first = run.scores.sort_values(key).reset_index(drop=True)
    again = rerun.scores.sort_values(key).reset_index(drop=True)
    same = key + ["image_uri", "label", "k", "k_used", "reference_ids", "model_id"]
    pd.testing.assert_frame_equal(first[same], again[same], check_exact=True)
    # Bit for bit is not promised: the backbone's pooled embedding of an image differs in the
    # last float32 bits with the size of the batch it ran in (about 5e-7), and which images
    # share a batch is up to the runner's bundles.
    pd.testing.assert_frame_equal(first[SCORE_COLUMNS], again[SCORE_COLUMNS],
                                  check_exact=False, rtol=0, atol=1e-5)


def test_metrics_counters(run):
    queries = _queries(run.manifest)
    refs = [normalize_row(r) for r in run.manifest[run.manifest.role == "reference"].to_dict(
        "records")]
    groups: dict = {}
    for r in refs:
        groups.setdefault((r.dataset, r.category), []).append(r)
    drawn = {r.image_id for g in groups.values() for s in SEEDS for r in draw_references(g, s, K)}
    assert len(drawn) < len(refs)  # only the drawn references are loaded as references ...
    # ... and the candidates not every seed drew, beside the queries, to calibrate decisions.
    calibration = pool_calibration(run.manifest, SEEDS, K)
    result = run.result
    assert counter(result, "manifest_rows_read") == len(run.manifest)
    assert counter(result, "images_loaded") == len(queries) + len(drawn) + len(calibration)
    assert counter(result, "calibration_images_selected") == len(calibration)
    assert counter(result, "queries_scored") == len(queries) * len(SEEDS)
    assert counter(result, "scores_rows_written") == len(run.scores)
    for failure in ("manifest_rows_rejected", "manifest_rows_duplicate", "images_failed",
                    "queries_failed", "errors_rows_written"):
        assert counter(result, failure) == 0
