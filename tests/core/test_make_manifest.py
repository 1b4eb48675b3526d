"""make_manifest: MVTec-AD / VisA-style trees → manifests."""
from __future__ import annotations

import os
import uuid

import fsspec
import pandas as pd
import pytest

from pipeline.core import make_manifest as mm, manifest as m
from tests.mvtec_tree import touch


def test_make_manifest_roles_labels_and_defects(mvtec_tree):
    df = mm.make_manifest([(mvtec_tree, None)])

    got = {
        (r.category, r.role, int(r.label), r.defect_type, os.path.relpath(r.image_uri, mvtec_tree))
        for r in df.itertuples()
    }
    assert got == {
        ("bottle", "reference", 0, None, "bottle/train/good/000.png"),
        ("bottle", "reference", 0, None, "bottle/train/good/001.PNG"),
        ("bottle", "query", 0, None, "bottle/test/good/000.png"),
        ("bottle", "query", 1, "broken_large", "bottle/test/broken_large/000.png"),
        ("bottle", "query", 1, "broken_large", "bottle/test/broken_large/001.png"),
        ("bottle", "query", 1, "contamination", "bottle/test/contamination/000.jpg"),
        ("cable", "reference", 0, None, "cable/train/good/000.bmp"),
        ("cable", "query", 1, "cut", "cable/test/cut/000.tiff"),
    }
    assert set(df["dataset"]) == {"mvtec"}
    assert df["image_id"].tolist() == [m.default_image_id(u) for u in df["image_uri"]]
    assert all(os.path.isabs(u) for u in df["image_uri"])


def test_an_mvtec_tree_with_validation_good_has_calibration_rows(mvtec_tree):
    # MVTec LOCO AD's and MVTec AD 2's place for held-out normal images (the demo's too).
    touch(os.path.join(mvtec_tree, "bottle/validation/good/000.png"))
    touch(os.path.join(mvtec_tree, "bottle/validation/good/001.png"))
    df = mm.make_manifest([(mvtec_tree, None)])
    held = df[df["role"] == "calibration"]
    assert sorted(os.path.relpath(u, mvtec_tree) for u in held["image_uri"]) == [
        "bottle/validation/good/000.png", "bottle/validation/good/001.png"]
    assert (held["label"] == 0).all() and set(held["category"]) == {"bottle"}
    assert df["role"].value_counts().to_dict() == {"query": 5, "reference": 3, "calibration": 2}


def test_make_manifest_is_sorted_and_deterministic(mvtec_tree, tmp_path):
    other = tmp_path / "visa"
    touch(str(other / "pcb1/train/good/000.JPG"))
    touch(str(other / "pcb1/test/bad/000.JPG"))

    first = mm.make_manifest([(str(other), "VisA"), (mvtec_tree, "MVTec")])
    second = mm.make_manifest([(str(other), "VisA"), (mvtec_tree, "MVTec")])

    pd.testing.assert_frame_equal(first, second)
    keys = list(zip(first["dataset"], first["category"], first["image_uri"]))
    assert keys == sorted(keys)
    assert set(first["dataset"]) == {"VisA", "MVTec"}


def test_make_manifest_rejects_roots_without_layout(tmp_path):
    touch(str(tmp_path / "flat" / "a.png"))
    with pytest.raises(ValueError, match="layout"):
        mm.make_manifest([(str(tmp_path / "flat"), None)])
    with pytest.raises(ValueError, match="does not exist"):
        mm.make_manifest([(str(tmp_path / "nowhere"), None)])
    with pytest.raises(ValueError):
        mm.make_manifest([])


def test_made_manifest_round_trips_and_every_row_normalises(mvtec_tree, tmp_path):
    path = str(tmp_path / "out" / "manifest.parquet")
    m.write_manifest(mm.make_manifest([(mvtec_tree, None)]), path)

    m.validate_manifest_schema(path)
    rows = pd.read_parquet(path).to_dict("records")
    normalised = [m.normalize_row(r) for r in rows]
    assert all(isinstance(r, m.ManifestRow) for r in normalised)
    assert sorted(r.label for r in normalised) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_make_manifest_keeps_urls_for_remote_roots():
    root = f"memory://trees/{uuid.uuid4().hex}/mv"
    for name in ("c/train/good/0.png", "c/test/hole/0.png"):
        with fsspec.open(f"{root}/{name}", "wb") as f:
            f.write(name.encode())

    df = mm.make_manifest([(root, None)])

    assert set(df["dataset"]) == {"mv"}
    for uri, role in zip(df["image_uri"], df["role"]):
        assert uri.startswith("memory://")
        with fsspec.open(uri, "rb") as f:  # the URI really points at the file
            assert f.read().decode().startswith("c/train" if role == "reference" else "c/test")


# --------------------------------------------------------------------------
# ground-truth masks
# --------------------------------------------------------------------------


def _masks(df: pd.DataFrame, root: str) -> dict[str, str | None]:
    return {os.path.relpath(r.image_uri, root): (None if r.mask_uri is None
                                                  else os.path.relpath(r.mask_uri, root))
            for r in df.itertuples()}


def test_mvtec_masks_are_found_and_missing_ones_are_null(mvtec_tree, caplog):
    with caplog.at_level("DEBUG", logger="pipeline.core.datasets.mvtec"):
        df = mm.make_manifest([(mvtec_tree, None)])

    masks = _masks(df, mvtec_tree)
    # Only bottle/ground_truth/broken_large/000_mask.png is where MVTec AD keeps masks;
    # bottle/test/ground_truth/... is not, and normal images never get one.
    assert masks == {
        "bottle/train/good/000.png": None,
        "bottle/train/good/001.PNG": None,
        "bottle/test/good/000.png": None,
        "bottle/test/broken_large/000.png": "bottle/ground_truth/broken_large/000_mask.png",
        "bottle/test/broken_large/001.png": None,
        "bottle/test/contamination/000.jpg": None,
        "cable/train/good/000.bmp": None,
        "cable/test/cut/000.tiff": None,
    }
    assert "No ground-truth mask for" in caplog.text and "001.png" in caplog.text
    assert os.path.isabs(df["mask_uri"].dropna().iloc[0])


def test_visa_split_layout_masks_keep_the_image_name(tmp_path):
    # VisA after split_csv/1cls.csv: images .JPG, masks .png under ground_truth/bad/.
    root = tmp_path / "visa"
    for name in ("pcb1/train/good/0001.JPG", "pcb1/test/good/0002.JPG", "pcb1/test/bad/000.JPG",
                 "pcb1/test/bad/001.JPG", "pcb1/ground_truth/bad/000.png",
                 "pcb1/ground_truth/bad/unrelated.png"):
        touch(str(root / name))

    masks = _masks(mm.make_manifest([(str(root), "VisA")]), str(root))

    assert masks["pcb1/test/bad/000.JPG"] == "pcb1/ground_truth/bad/000.png"
    assert masks["pcb1/test/bad/001.JPG"] is None
    assert masks["pcb1/test/good/0002.JPG"] is None and masks["pcb1/train/good/0001.JPG"] is None


def test_mvtec_mask_name_wins_over_a_plain_name(tmp_path):
    root = tmp_path / "mv"
    for name in ("c/test/hole/000.png", "c/ground_truth/hole/000.png",
                 "c/ground_truth/hole/000_mask.png"):
        touch(str(root / name))
    masks = _masks(mm.make_manifest([(str(root), None)]), str(root))
    assert masks == {"c/test/hole/000.png": "c/ground_truth/hole/000_mask.png"}


def test_masks_of_remote_roots_are_urls_and_round_trip(tmp_path):
    root = f"memory://trees/{uuid.uuid4().hex}/mv"
    for name in ("c/train/good/0.png", "c/test/hole/0.png", "c/ground_truth/hole/0_mask.png"):
        with fsspec.open(f"{root}/{name}", "wb") as f:
            f.write(name.encode())

    df = mm.make_manifest([(root, None)])

    mask = df.loc[df["defect_type"] == "hole", "mask_uri"].item()
    assert mask.startswith("memory://")
    with fsspec.open(mask, "rb") as f:
        assert f.read() == b"c/ground_truth/hole/0_mask.png"
    path = str(tmp_path / "m.parquet")
    m.write_manifest(df, path)
    rows = [m.normalize_row(r) for r in pd.read_parquet(path).to_dict("records")]
    assert sorted((r.role, r.mask_uri) for r in rows) == [("query", mask), ("reference", None)]


# --------------------------------------------------------------------------------------------
# bad input: one warning each, naming the file, and counted; nothing dropped silently
# --------------------------------------------------------------------------------------------


def _real_mvtec(tmp_path) -> str:
    from tests.dataset_trees import image, mask

    root = tmp_path / "real_mvtec"
    for name in ("screw/train/good/000.png", "screw/test/good/000.png",
                 "screw/test/thread_top/000.png", "screw/test/thread_top/001.png"):
        image(root / name)
    mask(root / "screw/ground_truth/thread_top/000_mask.png")
    mask(root / "screw/ground_truth/thread_top/001_mask.png")
    return str(root)


def test_a_tree_of_good_files_has_no_problems(tmp_path):
    built = mm.build_manifest([mm.DatasetRoot(_real_mvtec(tmp_path))])
    assert built.problems.total == 0 and len(built.frame) == 4


def test_bad_input_is_reported_per_file_and_counted(tmp_path, caplog):
    from tests.dataset_trees import image, mask

    root = _real_mvtec(tmp_path)
    wrong = mask(f"{root}/screw/ground_truth/thread_top/001_mask.png", size=(5, 5))
    orphan = mask(f"{root}/screw/ground_truth/thread_top/007_mask.png")
    lonely = mask(f"{root}/screw/ground_truth/thread_side/000_mask.png")  # no test/thread_side
    os.makedirs(f"{root}/screw/test/manipulated_front")  # an empty defect folder
    empty = f"{root}/screw/test/good/001.png"
    touch(empty, b"")
    touch(f"{root}/screw/test/thread_top/000.png", b"")  # empty, with a mask: reported once
    broken = f"{root}/screw/train/good/001.png"
    os.symlink(f"{root}/nowhere.png", broken)
    image(f"{root}/screw/elsewhere/002.png")
    linked = f"{root}/screw/train/good/002.png"
    os.symlink(f"{root}/screw/elsewhere/002.png", linked)

    with caplog.at_level("WARNING"):
        built = mm.build_manifest([mm.DatasetRoot(root)])

    assert dict(built.problems.counts) == {"mask_size": 1, "orphan_mask": 2, "empty_folder": 1,
                                           "unreadable": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 7
    for path in (wrong, orphan, lonely, f"{root}/screw/test/manipulated_front", empty, broken,
                 f"{root}/screw/test/thread_top/000.png"):
        assert sum(w.startswith(f"{path}: ") for w in warnings) == 1, path
    # Unreadable images and the mismatched mask stay in the manifest (the job reports them
    # per row); a link to an image is an image like any other.
    uris = set(built.frame["image_uri"])
    assert {empty, broken, linked} <= uris
    assert built.frame.loc[built.frame["image_uri"].str.endswith("thread_top/001.png"),
                           "mask_uri"].item() == wrong
