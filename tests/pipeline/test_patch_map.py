"""--write-patch-map and pass-through columns, end to end on one small demo category."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.cli.score import parse_score_command
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import PATCH_MAP_FIELDS, SCORES
from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.run import run_score
from tests.beamtest import read_table


def parse_score_args(argv):
    """(configuration, Beam's flags) of score's command line."""
    return parse_score_command(argv)[:2]


DATASET = "medical_scans"
EXTRA = {
    "batch_no": pa.int32(),
    "weight": pa.float32(),
    "seen_at": pa.timestamp("ms"),
    "inspected": pa.bool_(),
    "shift_day": pa.date32(),
    "tags": pa.list_(pa.string()),
}


def _extra_values(i: int) -> dict:
    return {"batch_no": i, "weight": i / 4, "seen_at": dt.datetime(2024, 1, 1, i % 24),
            "inspected": i % 2 == 0, "shift_day": None if i % 3 == 0 else dt.date(2024, 2, 1 + i),
            "tags": [f"t{i}"] * (i % 3)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch_map")
    roots = generate_demo(str(root / "data"), image_size=32, n_train=3, n_test_good=2,
                          n_test_defect_per_type=1)
    frame = make_manifest([r for r in roots if r[1] == DATASET])
    plain = str(root / "plain.parquet")
    write_manifest(frame, plain)
    table = pq.read_table(plain)
    values = [_extra_values(i) for i in range(len(table))]
    for name, type_ in EXTRA.items():
        table = table.append_column(pa.field(name, type_), pa.array(
            [v[name] for v in values], type_))
    path = str(root / "manifest.parquet")
    pq.write_table(table, path)
    config, beam_args = parse_score_args([
        "--manifest", path, "--output", str(root / "out"), "--k", "2", "--seeds", "3",
        "--write-patch-map", "--backbone", tiny_spec().name, "--pretrained", tiny_spec().pretrained,
        "--run-date", "2024-03-07"])
    assert config.write_patch_map and beam_args == []
    run_score(config, beam_args)
    return config, table, read_table(config.output, SCORES)


def test_patch_map_has_one_value_per_patch(run):
    config, _, scores = run
    patches = get_backbone(tiny_spec()).geometry.num_patches
    assert patches == 64
    schema = pads.dataset(f"{config.output}/{SCORES}", format="parquet",
                          partitioning="hive").schema
    for f in PATCH_MAP_FIELDS:
        assert schema.field(f.name) == f
    assert len(scores) > 0
    for rec in scores.itertuples():
        patch_map = np.asarray(rec.patch_map)
        assert patch_map.shape == (patches,)
        assert (rec.patch_map_height, rec.patch_map_width) == get_backbone(
            tiny_spec()).geometry.grid
        # Training-free, the fine score is the largest patch residual.
        assert rec.fine_score == pytest.approx(float(patch_map.max()), abs=1e-6)


def test_passthrough_columns_keep_types_and_values(run):
    config, manifest, scores = run
    schema = pads.dataset(f"{config.output}/{SCORES}", format="parquet",
                          partitioning="hive").schema
    for name, type_ in EXTRA.items():
        assert schema.field(name).type == type_
    written = pads.dataset(f"{config.output}/{SCORES}", format="parquet",
                           partitioning="hive").to_table().to_pylist()
    source = {r["image_id"]: r for r in manifest.to_pylist()}
    assert written
    for rec in written:
        for name in EXTRA:
            assert rec[name] == source[rec["image_id"]][name], name
