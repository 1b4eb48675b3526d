"""Real-IAD as published: per-category JSON split files, one row per camera view.

Format from Tencent/AnomalyDetection_Real-IAD: ``README.md`` (``realiad_jsons/<category>.json``
beside ``realiad_1024/``) and ``datasets/explicit_dataset.py`` (top-level ``meta``, ``train``,
``test``; entries with exactly ``category``, ``anomaly_class``, ``image_path``,
``mask_path``; ``meta`` has ``prefix`` and ``normal_class``; files are
``<image_dir>/<prefix>/<image_path>``); the sample key is the README's ADEval pattern
``<category>_<NNNN>_<class>`` before ``_C<view>_``.
"""
from __future__ import annotations

import json

import pytest

from pipeline.core.datasets.realiad import sample_and_view
from pipeline.core.make_manifest import DatasetRoot, ReadOptions, build_manifest
from tests.core.datasets.helpers import rows_of
from tests.dataset_trees import (REALIAD_NG1, REALIAD_NG1_MASK, REALIAD_NG2, REALIAD_OK1,
                                 REALIAD_OK2, REALIAD_TEST_OK, image, make_realiad, mask,
                                 realiad_entry, text)

OK1, OK2, NG1, NG2 = REALIAD_OK1, REALIAD_OK2, REALIAD_NG1, REALIAD_NG2
NG1_MASK, TEST_OK = REALIAD_NG1_MASK, REALIAD_TEST_OK
_entry = realiad_entry


@pytest.fixture
def realiad(tmp_path) -> str:
    return make_realiad(tmp_path)


def test_realiad_one_row_per_view_with_sample_and_view(realiad):
    built = build_manifest([DatasetRoot(realiad)])

    assert built.layouts == [(realiad, "realiad")]
    assert set(built.frame["dataset"]) == {"Real-IAD"}
    prefix = "realiad_1024/audiojack/"
    assert rows_of(built.frame, realiad, "sample_id", "view") == {
        (prefix + OK1, "audiojack", "reference", 0, None, None, "audiojack_0001_OK", "C1"),
        (prefix + OK2, "audiojack", "reference", 0, None, None, "audiojack_0001_OK", "C2"),
        (prefix + NG1, "audiojack", "query", 1, "BX", prefix + NG1_MASK,
         "audiojack_0002_NG", "C1"),
        (prefix + NG2, "audiojack", "query", 0, None, None, "audiojack_0002_NG", "C2"),
        (prefix + TEST_OK, "audiojack", "query", 0, None, None, "audiojack_0003_OK", "C1"),
    }
    assert built.problems.total == 0


def test_realiad_other_split_set_and_image_folder(realiad):
    for name in (OK1, NG1):
        image(f"{realiad}/realiad_256/audiojack/{name}")
    mask(f"{realiad}/realiad_256/audiojack/{NG1_MASK}")

    built = build_manifest([DatasetRoot(realiad)],
                           ReadOptions(realiad_jsons="realiad_jsons_sv",
                                       realiad_images="realiad_256"))

    assert sorted(built.frame["image_uri"]) == sorted(
        f"{realiad}/realiad_256/audiojack/{n}" for n in (OK1, NG1))


def test_realiad_split_sets_nested_as_the_archive_unpacks(realiad, tmp_path):
    nested = tmp_path / "nested" / "Real-IAD"
    text(nested / "realiad_jsons" / "realiad_jsons_sv" / "audiojack.json",
         open(f"{realiad}/realiad_jsons_sv/audiojack.json", encoding="utf-8").read())
    text(nested / "realiad_jsons" / "realiad_jsons" / "audiojack.json",
         open(f"{realiad}/realiad_jsons/audiojack.json", encoding="utf-8").read())
    for name in (OK1, OK2, NG1, NG2, TEST_OK):
        image(nested / "realiad_1024" / "audiojack" / name)
    mask(nested / "realiad_1024" / "audiojack" / NG1_MASK)

    assert len(build_manifest([DatasetRoot(str(nested))]).frame) == 5
    sv = build_manifest([DatasetRoot(str(nested))], ReadOptions(realiad_jsons="realiad_jsons_sv"))
    assert len(sv.frame) == 2


def test_realiad_missing_files_and_categories_are_reported(realiad, caplog):
    doc = {"meta": {"prefix": "mint/", "normal_class": "OK"},
           "train": [_entry("OK/S0001/mint_0001_OK_C1_1.jpg", category="mint")], "test": []}
    text(f"{realiad}/realiad_jsons/mint.json", json.dumps(doc))  # images not downloaded
    text(f"{realiad}/realiad_jsons/broken.json", "{not json")
    with open(f"{realiad}/realiad_jsons/audiojack.json", encoding="utf-8") as f:
        audiojack = json.load(f)
    audiojack["test"].append(_entry("NG/BX/S0009/audiojack_0009_NG_C1_1.jpg", "BX", "x.png"))
    audiojack["test"].append({"category": "audiojack"})
    text(f"{realiad}/realiad_jsons/audiojack.json", json.dumps(audiojack))

    with caplog.at_level("WARNING"):
        built = build_manifest([DatasetRoot(realiad)])

    assert len(built.frame) == 5
    assert built.problems.counts == {"missing": 2, "unreadable": 1, "bad_entry": 1}
    assert "realiad_1024/mint: image folder of" in caplog.text
    assert "audiojack_0009_NG_C1_1.jpg: image of" in caplog.text
    assert "broken.json: unreadable split file" in caplog.text


@pytest.mark.parametrize("path,want", [
    ("audiojack/NG/BX/S0002/audiojack_0002_NG_C5_20230922093311.jpg", ("audiojack_0002_NG", "C5")),
    ("toy_brick/OK/S0010/toy_brick_0010_OK_C3_20230101.jpg", ("toy_brick_0010_OK", "C3")),
    ("audiojack/OK/S0001/renamed.jpg", ("audiojack/OK/S0001", None)),
])
def test_sample_and_view_follow_the_datasets_sample_key(path, want):
    assert sample_and_view(path) == want


def test_fuiad_noise_in_train_stays_a_reference_without_a_label(realiad):
    """The FUIAD split sets hide anomalous images in train (the official training loader
    labels every train entry normal): a reference the draw may take, its class recorded."""
    doc = {"meta": {"prefix": "audiojack/", "normal_class": "OK"},
           "train": [_entry(OK1), _entry(NG1, "BX", NG1_MASK)], "test": [_entry(OK2)]}
    text(f"{realiad}/realiad_jsons_fuiad_0.4/audiojack.json", json.dumps(doc))

    built = build_manifest([DatasetRoot(realiad)],
                           ReadOptions(realiad_jsons="realiad_jsons_fuiad_0.4"))

    prefix = "realiad_1024/audiojack/"
    assert rows_of(built.frame, realiad) == {
        (prefix + OK1, "audiojack", "reference", 0, None, None),
        (prefix + NG1, "audiojack", "reference", None, "BX", None),
        (prefix + OK2, "audiojack", "query", 0, None, None),
    }


def test_views_of_unrecognised_names_are_null_strings_in_parquet(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.core.manifest import write_manifest

    root = tmp_path / "Real-IAD"
    image(root / "realiad_1024" / "audiojack" / "OK" / "S0001" / "front.jpg")
    text(root / "realiad_jsons" / "audiojack.json", json.dumps(
        {"meta": {"prefix": "audiojack", "normal_class": "OK"},
         "train": [_entry("OK/S0001/front.jpg")], "test": []}))

    built = build_manifest([DatasetRoot(str(root))])
    path = str(tmp_path / "m.parquet")
    write_manifest(built.frame, path)

    assert built.frame["sample_id"].tolist() == ["audiojack/OK/S0001"]
    schema = pq.read_schema(path)
    assert str(schema.field("view").type) in ("string", "large_string")  # not Arrow's null
    assert pq.read_table(path).column("view").null_count == 1
