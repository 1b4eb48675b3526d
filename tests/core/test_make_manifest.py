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
