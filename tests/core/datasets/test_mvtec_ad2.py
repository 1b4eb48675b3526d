"""MVTec AD 2 as published: validation/good as calibration, test_public with masks, the
private test sets as unlabelled queries.

Layout from the dataset's release (and anomalib's ``mvtecad2.py``): ``<category>/
{train/good, validation/good, test_public/good, test_public/bad, test_private,
test_private_mixed}`` with masks ``test_public/ground_truth/bad/<name>_mask.png``.
"""
from __future__ import annotations

import pytest

from pipeline.core.make_manifest import DatasetRoot, build_manifest
from tests.core.datasets.helpers import rows_of
from tests.dataset_trees import make_ad2, mask


@pytest.fixture
def ad2(tmp_path) -> str:
    return make_ad2(tmp_path)


def test_ad2_splits_roles_labels_and_masks(ad2):
    built = build_manifest([DatasetRoot(ad2, "ad2")])

    assert built.layouts == [(ad2, "mvtec_ad2")]
    assert rows_of(built.frame, ad2, "split") == {
        ("can/train/good/000_regular.png", "can", "reference", 0, None, None, "train"),
        ("can/validation/good/000_regular.png", "can", "calibration", 0, None, None,
         "validation"),
        ("can/test_public/good/000_regular.png", "can", "query", 0, None, None, "test_public"),
        ("can/test_public/bad/000_regular.png", "can", "query", 1, "bad",
         "can/test_public/ground_truth/bad/000_regular_mask.png", "test_public"),
        ("can/test_public/bad/001_regular.png", "can", "query", 1, "bad",
         "can/test_public/ground_truth/bad/001_regular_mask.png", "test_public"),
        ("can/test_private/000_regular.png", "can", "query", None, None, None, "test_private"),
        ("can/test_private_mixed/000_overexposed.png", "can", "query", None, None, None,
         "test_private_mixed"),
        ("vial/train/good/000_regular.png", "vial", "reference", 0, None, None, "train"),
        ("vial/test_public/good/000_regular.png", "vial", "query", 0, None, None,
         "test_public"),
    }
    # vial has no test_public/bad: that folder is expected, so it is reported.
    assert built.problems.counts == {"empty_folder": 1}


def test_ad2_mask_without_image_and_of_another_size(ad2, caplog):
    orphan = mask(f"{ad2}/can/test_public/ground_truth/bad/007_regular_mask.png")
    other = mask(f"{ad2}/can/test_public/ground_truth/bad/001_regular_mask.png", size=(3, 3))
    with caplog.at_level("WARNING"):
        built = build_manifest([DatasetRoot(ad2, "ad2")])
    assert built.problems.counts["orphan_mask"] == 1
    assert built.problems.counts["mask_size"] == 1
    assert f"{orphan}: mask without an image" in caplog.text
    assert f"{other}: mask is 3x3 (WxH), its image" in caplog.text
