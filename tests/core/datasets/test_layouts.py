"""``auto`` recognises each published layout from its files; a tree that matches none gets
an error naming what it holds and every layout; the closing line's counts."""
from __future__ import annotations

import pytest

from pipeline.core.datasets import LAYOUT_NAMES, layout_for
from pipeline.core.datasets.base import Problems, Tree
from pipeline.core.make_manifest import DatasetRoot, ReadOptions, build_manifest
from tests.dataset_trees import image, make_ad2, make_loco, make_realiad, make_visa, text
from tests.mvtec_tree import make_mvtec_tree


@pytest.mark.parametrize("make,layout", [
    (make_mvtec_tree, "mvtec"), (make_visa, "visa"), (make_loco, "mvtec_loco"),
    (make_ad2, "mvtec_ad2"), (make_realiad, "realiad"),
])
def test_auto_recognises_each_layout(tmp_path, make, layout):
    assert layout_for(Tree(make(tmp_path))).name == layout


def test_several_layouts_in_one_manifest(tmp_path):
    roots = [make_mvtec_tree(tmp_path), make_visa(tmp_path), make_loco(tmp_path),
             make_ad2(tmp_path), make_realiad(tmp_path)]
    built = build_manifest([DatasetRoot(r) for r in roots],
                           ReadOptions(mask_dir=str(tmp_path / "masks")))
    assert [layout for _, layout in built.layouts] == ["mvtec", "visa", "mvtec_loco",
                                                       "mvtec_ad2", "realiad"]
    assert set(built.frame["role"]) == {"query", "reference", "calibration"}
    # Pass-through columns of some layouts are null on the others' rows.
    assert {"sample_id", "view", "split"} <= set(built.frame.columns)
    mvtec = built.frame[built.frame["dataset"] == "mvtec"]
    assert mvtec[["sample_id", "view", "split"]].isna().all().all()


def test_a_tree_matching_no_layout_names_what_it_holds_and_every_layout(tmp_path):
    root = tmp_path / "photos"
    image(root / "a.png")
    text(root / "notes.txt")
    image(root / "batch1" / "b.png")

    with pytest.raises(ValueError) as info:
        build_manifest([DatasetRoot(str(root))])

    message = str(info.value)
    assert "matches no known layout" in message
    assert "a.png, batch1/, notes.txt" in message
    for name in LAYOUT_NAMES:
        assert f"{name}: " in message
    assert "--queries" in message


def test_an_explicit_layout_is_used_and_checked(tmp_path):
    root = make_ad2(tmp_path)
    assert layout_for(Tree(root), "mvtec").name == "mvtec"
    with pytest.raises(ValueError, match="unknown layout 'mvtec3'.*auto, visa"):
        layout_for(Tree(root), "mvtec3")
    with pytest.raises(ValueError, match="not in the visa layout.*split_csv/1cls.csv.*holds "
                                         "can/, vial/"):
        build_manifest([DatasetRoot(root, layout="visa")])


def test_problem_summary_counts_by_kind():
    problems = Problems()
    assert problems.summary() == "no problems found"
    problems.add("empty_folder", "/a", "no images")
    problems.add("mask_size", "/b", "2x2")
    problems.add("mask_size", "/c", "2x2")
    problems.other_files = 1
    assert problems.summary() == ("2 masks of another size than their image, 1 empty or "
                                  "missing folder; 1 non-image file skipped")
    with pytest.raises(ValueError):
        problems.add("nonsense", "/d", "x")
