"""One golden reference image listed for two product lines serves both, extracted once."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import default_image_id, write_manifest
from pipeline.core.schemas import ERRORS, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from pipeline.runner import counter
from tests.beamtest import read_table

LINES = ("line-a", "line-b")


def test_a_shared_reference_scores_both_datasets_and_is_extracted_once(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("golden", "qa0", "qa1", "qb0", "qb1"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    golden, *queries = paths
    rows = [dict(image_uri=golden, dataset=line, category="part", role="reference", label=0)
            for line in LINES]
    rows += [dict(image_uri=q, dataset=LINES[i // 2], category="part", role="query",
                  label=i % 2) for i, q in enumerate(queries)]
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int64")
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(frame, manifest)

    config = ScoreConfig(manifest=manifest, output=str(tmp_path / "out"), k=1, seeds=(0, 1),
                         backbone=tiny_spec(), batch_size=2, run_date="2024-06-01")
    result = run_score(config)
    scores = read_table(config.output, SCORES)
    assert sorted(scores.groupby("dataset").size().items()) == [("line-a", 4), ("line-b", 4)]
    assert all(list(ids) == [default_image_id(golden)] for ids in scores["reference_ids"])
    errors = read_table(config.output, ERRORS)
    assert errors.empty, errors[["stage", "reason"]].to_dict("records")
    assert counter(result, "num_inferences", "ExtractReferenceFeatures") == 1
