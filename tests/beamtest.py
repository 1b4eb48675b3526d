"""Helpers for tests that run Beam: an offline test runner, counters and output readers.

Whole-job runs are expensive (tens of seconds), so each test module runs its job once in a
module-scoped fixture and its tests only read the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow.dataset as pads
from apache_beam.metrics import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import PARTITIONING, current_files
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import ManifestRow, write_manifest
from pipeline.core.schemas import SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from pipeline.runner import make_runner


def small_demo_manifest(root) -> str:
    """The embedded demo at 32 px (4 train, 3 good and 2 per defect type a category) under
    ``root``, and the path of its manifest: a whole job on it takes seconds."""
    roots = generate_demo(str(root / "data"), image_size=32, n_train=4, n_test_good=3,
                          n_test_defect_per_type=2)
    path = str(root / "manifest.parquet")
    write_manifest(make_manifest(roots), path)
    return path


SCORE_KEY = ["dataset", "category", "image_id", "seed", "scorer"]


def score_small(manifest: str, output: str, precision: str, run_id: str, feature_cache: str,
                scorers: tuple[str, ...], run_date: str, share_model: bool = False,
                **options) -> tuple[object, pd.DataFrame]:
    """One job on ``small_demo_manifest``'s manifest (k = 2, seed 0, batch 4, the tiny CLIP at
    ``precision``, the CNN a seeded random mobilenet_v2 unless ``options`` say otherwise;
    ``share_model``: the models served from one process per machine):
    (result, score rows sorted by ``SCORE_KEY``)."""
    config = ScoreConfig(manifest=manifest, output=output, k=2, seeds=(0,),
                         backbone=tiny_spec(precision=precision), run_date=run_date,
                         run_id=run_id, batch_size=4, feature_cache=feature_cache,
                         scorers=scorers, share_model_across_processes=share_model,
                         options={"cnn_backbone": "mobilenet_v2", "cnn_weights": "random:0",
                                  **options})
    result = run_score(config, beam_args=[])
    return result, read_table(output, SCORES).sort_values(SCORE_KEY).reset_index(drop=True)


@dataclass
class Run:
    """One scoring run of a test module, with its outputs read back."""

    config: ScoreConfig
    manifest: pd.DataFrame
    result: object
    scores: pd.DataFrame
    errors: pd.DataFrame


def offline_pipeline() -> TestPipeline:
    """A TestPipeline on the in-process runner the job itself uses (no Prism download)."""
    return TestPipeline(runner=make_runner(PipelineOptions([])))


def counter(result, name: str) -> int:
    """A Beam counter summed over every step that reports it (0 when none does)."""
    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in found)


def read_table(output: str, table: str) -> pd.DataFrame:
    """An output table as pandas, read as users are told to: the files in force
    (``current_files``) with hive partitioning, partition columns as plain strings."""
    files = current_files(output, table)
    data = pads.dataset(files, format="parquet", partitioning=PARTITIONING,
                        partition_base_dir=f"{output.rstrip('/')}/{table}")
    return data.to_table().to_pandas()


def mrow(image_id: str, *, role: str = "reference", category: str = "cat", dataset: str = "ds",
         label: int | None = 0, uri: str | None = None, extra: tuple = ()) -> ManifestRow:
    """A valid manifest row for transform tests."""
    return ManifestRow(
        image_uri=uri or f"/data/{dataset}/{category}/{image_id}.png", dataset=dataset,
        category=category, role=role, label=label, image_id=image_id, defect_type=None,
        capture_date=None, extra=extra)


def pool_calibration(manifest: pd.DataFrame, seeds, k: int) -> set[tuple[str, str]]:
    """(dataset, image_id) of the reference candidates the random draw leaves to calibrate
    some seed: every normal candidate that not every seed draws (what SelectCalibration
    loads beside the queries; k = 0 leaves them all)."""
    from pipeline.core.manifest import normalize_row
    from pipeline.core.sampling import draw_references

    groups: dict = {}
    for raw in manifest[manifest["role"] == "reference"].to_dict("records"):
        row = normalize_row(raw)
        if row.label != 1:
            groups.setdefault((row.dataset, row.category), []).append(row)
    left = set()
    for members in groups.values():
        every = set.intersection(*({r.image_id for r in draw_references(members, s, k)}
                                   for s in seeds))
        left |= {(r.dataset, r.image_id) for r in members if r.image_id not in every}
    return left
