"""Tests for pipeline.core.demo_data: deterministic MVTec-layout data with visible local defects."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from pipeline.core import demo_data
from pipeline.core.demo_data import generate_demo, mask_path
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
                is_mask = "ground_truth" in os.path.relpath(dirpath, base).split(os.sep)
                for file in names:
                    with Image.open(os.path.join(dirpath, file)) as im:
                        assert im.size == (48, 48)
                        assert im.mode == ("L" if name == "medical_scans" or is_mask else "RGB")


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


# ---------------------------------------------------------------- ground-truth masks

# sha256 of every image's path, mode and pixels (masks excluded) of
# generate_demo(root, image_size=32, n_train=4, n_test_good=2, n_test_defect_per_type=2),
# taken with the generator as it was before it wrote masks: painting the masks must not
# move the random stream, or every score computed on the demo changes.
SMALL_DEMO_PIXELS_SHA256 = "091fe62feda4f3666ebfcc2aa8221acc8748dda9833a3169b4effb5a6abde1f2"


def _pixel_digest(root: str) -> str:
    files = sorted(os.path.relpath(os.path.join(d, n), root)
                   for d, _, names in os.walk(root) for n in names)
    digest = hashlib.sha256()
    for rel in files:
        if "ground_truth" in rel.split(os.sep):
            continue
        with Image.open(os.path.join(root, rel)) as im:
            digest.update(rel.encode())
            digest.update(im.mode.encode())
            digest.update(np.asarray(im).tobytes())
    return digest.hexdigest()


def test_images_are_those_of_the_generator_before_masks(tmp_path):
    root = str(tmp_path)
    generate_demo(root, image_size=32, n_train=4, n_test_good=2, n_test_defect_per_type=2)
    assert _pixel_digest(root) == SMALL_DEMO_PIXELS_SHA256


def _mask(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        pixels = np.asarray(im)
    assert set(np.unique(pixels)) <= {0, 255}
    return pixels > 0


def test_every_defect_image_has_a_mask_and_make_manifest_finds_it(demo, manifest):
    root, _ = demo
    defects = manifest[manifest["label"] == 1]
    normals = manifest[manifest["label"] == 0]
    assert len(defects) and defects["mask_uri"].notna().all()
    assert normals["mask_uri"].isna().all()
    for row in defects.itertuples():
        category_root = os.path.dirname(os.path.dirname(os.path.dirname(row.image_uri)))
        index = int(os.path.splitext(os.path.basename(row.image_uri))[0])
        assert row.mask_uri == mask_path(category_root, row.defect_type, index)
        assert row.mask_uri.endswith(f"ground_truth/{row.defect_type}/{index:03d}_mask.png")
        with Image.open(row.image_uri) as image, Image.open(row.mask_uri) as mask:
            assert mask.size == image.size
        covered = _mask(row.mask_uri).mean()
        assert 0.001 < covered < 0.2, row.image_uri  # a local defect, not empty
    masks = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
             if "ground_truth" in d]
    assert sorted(masks) == sorted(defects["mask_uri"])


def test_masks_hold_exactly_the_painted_pixels(tmp_path):
    """Regenerate each defect image without its defect: every changed pixel is in the mask,
    and the mask is the painter's footprint (weights above 0), most of it visibly changed."""
    root = str(tmp_path)
    size = 48
    generate_demo(root, image_size=size, n_train=1, n_test_good=1, n_test_defect_per_type=2)
    for dataset, categories in demo_data.DATASETS.items():
        for category, spec in categories.items():
            base = os.path.join(root, dataset, category)
            for defect in spec.defects:
                for index in range(2):
                    split = f"test/{defect}"
                    rng = demo_data._rng(0, dataset, category, split, index)
                    clean = np.clip(np.rint(spec.normal(rng, size)), 0, 255)
                    with Image.open(os.path.join(base, split, f"{index:03d}.png")) as im:
                        painted = np.asarray(im, dtype=np.float64)
                    painted = painted[..., None] if painted.ndim == 2 else painted
                    changed = (painted != clean).any(axis=-1)
                    mask = _mask(mask_path(base, defect, index))
                    assert changed.any(), (category, defect, index)
                    assert not (changed & ~mask).any(), (category, defect, index)
                    assert (changed & mask).sum() >= 0.5 * mask.sum(), (category, defect, index)
