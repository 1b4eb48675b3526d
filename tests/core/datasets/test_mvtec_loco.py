"""MVTec LOCO AD as published: validation/good as calibration, logical and structural
anomalies kept apart, one ground-truth folder of mask PNGs per anomalous image.

Layout from the dataset's release (and anomalib's ``mvtec_loco.py``):
``<category>/{train/good, validation/good, test/good, test/logical_anomalies,
test/structural_anomalies}/NNN.png`` and ``<category>/ground_truth/<defect>/NNN/MMM.png``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipeline.core.make_manifest import DatasetRoot, ReadOptions, build_manifest
from tests.core.datasets.helpers import rows_of
from tests.dataset_trees import SIZE, make_loco, mask


@pytest.fixture
def loco(tmp_path) -> str:
    return make_loco(tmp_path)


def test_loco_roles_defect_types_and_masks(loco, tmp_path):
    masks = str(tmp_path / "out" / "m_masks")
    built = build_manifest([DatasetRoot(loco, "loco")], ReadOptions(mask_dir=masks))

    assert built.layouts == [(loco, "mvtec_loco")]
    union = os.path.join(masks, "loco/breakfast_box/logical_anomalies/000.png")
    got = rows_of(built.frame, loco)
    assert got == {
        ("breakfast_box/train/good/000.png", "breakfast_box", "reference", 0, None, None),
        ("breakfast_box/train/good/001.png", "breakfast_box", "reference", 0, None, None),
        ("breakfast_box/validation/good/000.png", "breakfast_box", "calibration", 0, None,
         None),
        ("breakfast_box/test/good/000.png", "breakfast_box", "query", 0, None, None),
        ("breakfast_box/test/logical_anomalies/000.png", "breakfast_box", "query", 1,
         "logical_anomalies", os.path.relpath(union, loco)),
        ("breakfast_box/test/logical_anomalies/001.png", "breakfast_box", "query", 1,
         "logical_anomalies", "breakfast_box/ground_truth/logical_anomalies/001/000.png"),
        ("breakfast_box/test/structural_anomalies/000.png", "breakfast_box", "query", 1,
         "structural_anomalies", "breakfast_box/ground_truth/structural_anomalies/000/000.png"),
        ("juice_bottle/train/good/000.png", "juice_bottle", "reference", 0, None, None),
        ("juice_bottle/test/structural_anomalies/000.png", "juice_bottle", "query", 1,
         "structural_anomalies", "juice_bottle/ground_truth/structural_anomalies/000/000.png"),
    }
    # Missing test/good and validation/good of juice_bottle: only test/good is expected.
    assert built.problems.counts == {"empty_folder": 1}
    assert built.problems.other_files == 0  # the json and txt files are not in image folders


def test_loco_union_mask_is_every_nonzero_pixel_of_its_pngs(loco, tmp_path):
    masks = str(tmp_path / "masks")
    build_manifest([DatasetRoot(loco, "loco")], ReadOptions(mask_dir=masks))

    with Image.open(os.path.join(masks, "loco/breakfast_box/logical_anomalies/000.png")) as im:
        assert im.mode == "L" and im.size == SIZE
        got = np.asarray(im)
    want = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    want[0:2, 0:2] = 255
    want[3:6, 5:8] = 255  # the second PNG's value 7 counts as defective too
    np.testing.assert_array_equal(got, want)


def test_loco_masks_of_another_size_are_reported_not_combined(loco, tmp_path, caplog):
    bad = mask(f"{loco}/breakfast_box/ground_truth/logical_anomalies/000/001.png", size=(4, 4))
    with caplog.at_level("WARNING"):
        built = build_manifest([DatasetRoot(loco, "loco")],
                               ReadOptions(mask_dir=str(tmp_path / "masks")))

    assert built.problems.counts["mask_size"] == 1
    assert f"{bad}: mask is 4x4 (WxH)" in caplog.text
    row = built.frame[built.frame["image_uri"].str.endswith("logical_anomalies/000.png")]
    assert row["mask_uri"].item() == bad  # the job refuses it per row, so it shows
    assert not os.path.exists(tmp_path / "masks")


def test_loco_several_masks_need_a_mask_folder(loco):
    with pytest.raises(ValueError, match="several mask files"):
        build_manifest([DatasetRoot(loco, "loco")])


def test_loco_ground_truth_without_an_image_is_reported(loco, tmp_path, caplog):
    mask(f"{loco}/breakfast_box/ground_truth/structural_anomalies/009/000.png")
    with caplog.at_level("WARNING"):
        built = build_manifest([DatasetRoot(loco, "loco")],
                               ReadOptions(mask_dir=str(tmp_path / "m")))
    assert built.problems.counts["orphan_mask"] == 1
    assert "structural_anomalies/009" in caplog.text
