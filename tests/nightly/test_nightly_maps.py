"""A nightly rerun that writes maps keeps the maps of the rows it carries."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pandas as pd
import pytest

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.nightly.job import NightlyOptions, run_nightly
from tests.beamtest import read_table

DATE = "2024-02-01"


@dataclass
class Nights:
    """Two nights of one date: the first scores the demo's first dataset, the second adds
    one late query; what each left behind."""

    late_category: str
    first_scores: pd.DataFrame
    first_summary: pd.DataFrame
    report: object
    scores: pd.DataFrame
    summary: pd.DataFrame


def _category_rows(out: str) -> pd.DataFrame:
    summary = pd.read_parquet(f"{out}/summary/run_date={DATE}/summary.parquet")
    return summary[summary.level == "category"].set_index("category")


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> Nights:
    tmp_path = tmp_path_factory.mktemp("nights")
    pairs = generate_demo(str(tmp_path / "data"), image_size=32, n_train=2, n_test_good=1,
                          n_test_defect_per_type=1)
    manifest = make_manifest(pairs)
    manifest = manifest[manifest.dataset == manifest.dataset.iloc[0]].copy()
    queries = manifest.index[manifest.role == "query"]
    manifest["capture_date"] = "2023-12-31"
    manifest.loc[queries, "capture_date"] = DATE
    write_manifest(manifest, str(tmp_path / "m1.parquet"))
    late = manifest.loc[queries[0]].copy()
    late["image_uri"] = str(tmp_path / "late.png")
    late["image_id"] = "late-query"
    shutil.copy(manifest.loc[queries[0], "image_uri"], late["image_uri"])
    write_manifest(pd.concat([manifest, late.to_frame().T], ignore_index=True),
                   str(tmp_path / "m2.parquet"))
    out = str(tmp_path / "out")
    base = dict(output=out, k=1, seeds=(0,), backbone=tiny_spec(), batch_size=4,
                run_date=DATE, write_anomaly_maps=True)
    run_nightly(ScoreConfig(manifest=str(tmp_path / "m1.parquet"), run_id="n1", **base), [],
                NightlyOptions())
    first_scores, first_summary = read_table(out, SCORES), _category_rows(out)
    report = run_nightly(ScoreConfig(manifest=str(tmp_path / "m2.parquet"), run_id="n2",
                                     **base), [], NightlyOptions())
    return Nights(manifest.loc[queries[0], "category"], first_scores, first_summary,
                  report, read_table(out, SCORES), _category_rows(out))


def test_carried_rows_keep_their_maps(nights):
    first, rows = nights.first_scores, nights.scores
    assert nights.report.scored_queries == 1 and nights.report.carried_rows == len(first)
    assert len(rows) == len(first) + 1
    for rec in rows.itertuples():
        assert os.path.isfile(rec.anomaly_map_uri) and os.path.isfile(rec.overlay_uri)
    kept = rows[rows.image_id != "late-query"].set_index("image_id").anomaly_map_uri
    assert kept.to_dict() == first.set_index("image_id").anomaly_map_uri.to_dict()


def test_carried_rows_count_in_the_pixel_metrics(nights):
    """The night stands for the whole date: its pixel metrics measure the carried rows
    through the maps they kept (decoded, 16 bits over their range), not only tonight's."""
    first, second = nights.first_summary, nights.summary
    assert first["pixel_images"].sum() > 0
    assert nights.report.scored_queries == 1
    late_category = nights.late_category
    added = pd.Series(0, index=first.index, name="pixel_images")
    added[late_category] = 1
    pd.testing.assert_series_equal(second["pixel_images"], first["pixel_images"] + added,
                                   check_dtype=False)
    untouched = [c for c in first.index if c != late_category]
    assert untouched
    for metric in ("pixel_auroc_mean", "aupro_mean"):
        assert second.loc[untouched, metric].to_numpy() == pytest.approx(
            first.loc[untouched, metric].to_numpy(), abs=1e-3, nan_ok=True)
