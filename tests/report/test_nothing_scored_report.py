"""The report of a run whose every query failed: an empty scores table, errors only."""
from __future__ import annotations

import pandas as pd

from pipeline.core.config import ScoreConfig
from pipeline.core.layout import read_partition
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS
from pipeline.model.backbone import tiny_spec
from pipeline.report import build_report
from pipeline.report.build import SECTION_FAILED
from pipeline.run import run_score
from tests.report.pagecheck import read_page

RUN_DATE = "2024-03-08"


def test_a_run_without_scores_gives_the_errors_and_a_sentence(tmp_path):
    frame = pd.DataFrame([
        dict(image_uri=str(tmp_path / "missing.png"), dataset="d", category="c", role="query",
             label=1),
        dict(image_uri=str(tmp_path / "also_missing.png"), dataset="d", category="c",
             role="query", label=0),
    ])
    frame["label"] = frame["label"].astype("Int64")
    write_manifest(frame, str(tmp_path / "manifest.parquet"))
    output = str(tmp_path / "out")
    run_score(ScoreConfig(manifest=str(tmp_path / "manifest.parquet"), output=output, k=2,
                          seeds=(0, 1), backbone=tiny_spec(), run_date=RUN_DATE,
                          run_id="nothing", max_failed_fraction=1.0),  # every row fails
              beam_args=[])
    errors = read_partition(output, RUN_DATE, ERRORS).to_pandas()
    assert len(errors) == 4

    with open(build_report(output, RUN_DATE), encoding="utf-8") as f:
        text = f.read()
    page = read_page(text)
    assert SECTION_FAILED not in text
    assert "No queries were scored" in text
    assert [s for s in page.sections if s.get("class") == "dataset"] == []
    counts = {c.attrs["data-stage"]: int(c.text) for c in page.cells_of("count")}
    assert counts == errors["stage"].value_counts().to_dict() == {"read_image": 4}
    assert "nothing" in text  # the run id, from the errors table
    assert page.images == []
