"""A night's plain folders, end to end: ``make-manifest --queries/--references/--calibration
--folder-per-line`` → the scoring job (tiny test backbone) → the report.

The lines have no labels, so the report shows each line's score quantiles; calibration
images are read into the manifest but neither scored, nor drawn as references, nor counted
as queries, nor reported as errors.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import make_manifest as make_manifest_cli
from pipeline.core.config import ScoreConfig
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.report import report_dir
from pipeline.run import _count_queries, run_score
from tests.beamtest import counter, read_table
from tests.report.pagecheck import read_page

RUN_DATE = "2024-07-01"
SEEDS = (0, 1)
K = 2
#: line → role folder → image count
LINES = {"line a": {"tonight": 3, "golden": 3, "held_out": 2},
         "linie_ö": {"tonight": 2, "golden": 2}}


def _noise(path: str, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("night")
    seed = 0
    for line, folders in LINES.items():
        for folder, n in folders.items():
            for i in range(n):
                seed += 1
                _noise(str(root / folder / line / f"capture {i}.png"), seed)
    manifest = str(root / "manifest.parquet")
    assert make_manifest_cli.main([
        "--queries", str(root / "tonight"), "--references", str(root / "golden"),
        "--calibration", str(root / "held_out"), "--folder-per-line",
        "--output", manifest]) == 0
    output = str(root / "out")
    config = ScoreConfig(manifest=manifest, output=output, k=K, seeds=SEEDS,
                         backbone=tiny_spec(), run_date=RUN_DATE, run_id="plain-folders",
                         batch_size=4)
    result = run_score(config, beam_args=[])
    with open(f"{report_dir(output, RUN_DATE)}/index.html", encoding="utf-8") as f:
        page = read_page(f.read())
    return (pd.read_parquet(manifest), result, read_table(output, SCORES),
            read_table(output, ERRORS), page, manifest)


def test_the_manifest_holds_every_image_in_its_role(night):
    frame = night[0]
    counts = frame.groupby(["dataset", "role"]).size().to_dict()
    assert counts == {("line a", "query"): 3, ("line a", "reference"): 3,
                      ("line a", "calibration"): 2, ("linie_ö", "query"): 2,
                      ("linie_ö", "reference"): 2}
    assert frame.loc[frame["role"] == "query", "label"].isna().all()


def test_every_query_is_scored_once_per_seed_and_calibration_never(night):
    frame, result, scores, errors, _, manifest = night
    queries = frame[frame["role"] == "query"]
    assert len(scores) == len(queries) * len(SEEDS)
    assert sorted(set(scores["image_uri"])) == sorted(queries["image_uri"])
    assert scores["label"].isna().all() and scores["final_score"].notna().all()
    calibration = set(frame.loc[frame["role"] == "calibration", "image_uri"])
    references = {u for refs in scores["reference_uris"] for u in refs}
    assert references <= set(frame.loc[frame["role"] == "reference", "image_uri"])
    assert not calibration & references
    assert errors.empty  # no error row, for calibration rows or any other
    assert counter(result, "queries_selected") == len(queries)
    assert _count_queries(manifest) == len(queries)  # the progress line's total


def test_the_report_shows_each_lines_score_quantiles(night):
    _, _, scores, _, page, _ = night
    for line in LINES:
        cells = {c.attrs["data-quantile"]: float(c.text)
                 for c in page.cells_of("quantile", line)}
        values = scores.loc[scores["dataset"] == line, "final_score"].to_numpy(dtype=float)
        # Pooled over both seeds; numpy's default (linear) quantile is the summary's.
        want = {"score_p50": np.quantile(values, 0.5), "score_p90": np.quantile(values, 0.9),
                "score_p99": np.quantile(values, 0.99), "score_max": values.max()}
        assert cells == {q: pytest.approx(v, rel=1e-3) for q, v in want.items()}, line
