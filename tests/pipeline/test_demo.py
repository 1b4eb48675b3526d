"""Tests for pipeline.core.demo_data: deterministic MVTec-layout data with visible local defects."""

from __future__ import annotations

import os

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import ManifestRow, normalize_row


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return root, generate_demo(root)


@pytest.fixture(scope="module")
def manifest(demo):
    return make_manifest(demo[1])


def test_same_seed_gives_byte_identical_files(demo, tmp_path):
    root, _ = demo
    generate_demo(str(tmp_path / "again"))
    generate_demo(str(tmp_path / "other_seed"), seed=1)

    first, again = _files(root), _files(str(tmp_path / "again"))
    other = _files(str(tmp_path / "other_seed"))

    assert first and first == again
    assert set(other) == set(first)
    assert all(other[name] != first[name] for name in first)


def test_returns_dataset_roots_with_names(demo):
    root, pairs = demo
    assert len(pairs) >= 3
    for dataset_root, name in pairs:
        assert dataset_root == os.path.join(root, name)
        assert os.path.isdir(dataset_root)


def test_layout_counts_and_image_properties(tmp_path):
    root = str(tmp_path)
    pairs = generate_demo(root, image_size=48, n_train=3, n_test_good=2, n_test_defect_per_type=1)

    for dataset_root, name in pairs:
        categories = sorted(os.listdir(dataset_root))
        assert categories
        for category in categories:
            base = os.path.join(dataset_root, category)
            assert sorted(os.listdir(os.path.join(base, "train", "good"))) == [
                "000.png", "001.png", "002.png"]
            splits = sorted(os.listdir(os.path.join(base, "test")))
            assert "good" in splits and len(splits) >= 3  # good + at least two defect types
            assert sorted(os.listdir(os.path.join(base, "test", "good"))) == ["000.png", "001.png"]
            for split in splits:
                if split != "good":
                    assert os.listdir(os.path.join(base, "test", split)) == ["000.png"]
            for dirpath, _, names in os.walk(base):
                for file in names:
                    with Image.open(os.path.join(dirpath, file)) as im:
                        assert im.size == (48, 48)
                        assert im.mode == ("L" if name == "medical_scans" else "RGB")


def test_defaults_are_small(manifest):
    assert 50 <= len(manifest) <= 150


def test_manifest_has_three_datasets_with_both_labels(manifest):
    assert manifest["dataset"].nunique() >= 3
    for dataset, group in manifest.groupby("dataset"):
        assert set(group["label"].astype(int)) == {0, 1}, dataset
        assert (group["role"] == "reference").any()
        assert group.loc[group["label"] == 1, "defect_type"].notna().all()
    assert {"scratch", "hole", "stain", "color_shift"} <= set(manifest["defect_type"].dropna())
    assert all(isinstance(normalize_row(r), ManifestRow) for r in manifest.to_dict("records"))


def _local_anomaly_map(image: np.ndarray, references: np.ndarray, window: int = 7) -> np.ndarray:
    """Distance to the closest reference, per pixel, averaged over a window."""
    distance = np.abs(references - image).mean(axis=-1).min(axis=0)
    return sliding_window_view(distance, (window, window)).mean(axis=(-2, -1))


def _pixels(uri: str) -> np.ndarray:
    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def test_defects_are_local_and_stand_out_from_normal_variation(manifest):
    for (dataset, category), group in manifest.groupby(["dataset", "category"]):
        references = np.stack([_pixels(u) for u in group.loc[group["role"] == "reference", "image_uri"]])
        queries = group[group["role"] == "query"]
        good = [_local_anomaly_map(_pixels(u), references).max()
                for u in queries.loc[queries["label"] == 0, "image_uri"]]
        defect_maps = [_local_anomaly_map(_pixels(u), references)
                       for u in queries.loc[queries["label"] == 1, "image_uri"]]

        assert good and defect_maps, (dataset, category)
        # Every defect is clearly stronger than any normal image's deviation...
        assert min(a.max() for a in defect_maps) > 2 * max(good), (dataset, category)
        # ...and confined to a small region, not a global change.
        for anomaly in defect_maps:
            assert (anomaly > anomaly.max() / 2).mean() < 0.1, (dataset, category)


def test_normal_images_vary_but_share_structure(manifest):
    for (dataset, category), group in manifest.groupby(["dataset", "category"]):
        normals = [_pixels(u) for u in group.loc[group["label"] == 0, "image_uri"][:3]]
        assert not np.array_equal(normals[0], normals[1]), (dataset, category)
        assert np.abs(normals[0] - normals[1]).mean() < 20, (dataset, category)


def test_rejects_tiny_images(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_demo(str(tmp_path), image_size=8)
