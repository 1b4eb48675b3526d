"""Plain folders of unlabelled images: a night's captures, known-good parts, calibration."""
from __future__ import annotations

import os
import uuid

import fsspec
import pandas as pd
import pytest

from pipeline.core import manifest as m
from pipeline.core.make_manifest import PlainFolders, build_manifest
from tests.core.datasets.helpers import rows_of
from tests.dataset_trees import image, text


@pytest.fixture
def night(tmp_path) -> str:
    root = tmp_path / "plant"
    for name in ("tonight/line_a/cam1/0001.png", "tonight/line_a/cam2/0002.jpg",
                 "tonight/line_b/0001.png", "golden/line_a/g1.png", "golden/line_a/g2.png",
                 "golden/line_b/g1.png", "held_out/line_a/c1.png"):
        image(root / name)
    text(root / "tonight/line_a/cam1/capture.log")
    return str(root)


def test_one_line_queries_references_and_calibration(night):
    p = f"{night}/"
    built = build_manifest([PlainFolders(
        dataset="line_a", queries=(p + "tonight/line_a",), references=(p + "golden/line_a",),
        calibration=(p + "held_out/line_a",), category="bracket")])

    assert rows_of(built.frame, night) == {
        ("tonight/line_a/cam1/0001.png", "bracket", "query", None, None, None),
        ("tonight/line_a/cam2/0002.jpg", "bracket", "query", None, None, None),
        ("golden/line_a/g1.png", "bracket", "reference", 0, None, None),
        ("golden/line_a/g2.png", "bracket", "reference", 0, None, None),
        ("held_out/line_a/c1.png", "bracket", "calibration", 0, None, None),
    }
    assert set(built.frame["dataset"]) == {"line_a"}
    assert built.problems.total == 0 and built.problems.other_files == 1
    assert built.layouts == []


def test_repeated_lines_and_category_defaults_to_the_dataset(night):
    p = f"{night}/"
    built = build_manifest([
        PlainFolders(dataset="a", queries=(p + "tonight/line_a",),
                     references=(p + "golden/line_a",)),
        PlainFolders(dataset="b", queries=(p + "tonight/line_b",),
                     references=(p + "golden/line_b",)),
    ])
    counts = built.frame.groupby(["dataset", "category", "role"]).size().to_dict()
    assert counts == {("a", "a", "query"): 2, ("a", "a", "reference"): 2,
                      ("b", "b", "query"): 1, ("b", "b", "reference"): 1}


def test_one_folder_per_line(night):
    p = f"{night}/"
    built = build_manifest([PlainFolders(queries=(p + "tonight",), references=(p + "golden",),
                                         calibration=(p + "held_out",), folder_per_line=True)])

    counts = built.frame.groupby(["dataset", "role"]).size().to_dict()
    assert counts == {("line_a", "query"): 2, ("line_a", "reference"): 2,
                      ("line_a", "calibration"): 1, ("line_b", "query"): 1,
                      ("line_b", "reference"): 1}
    assert (built.frame["category"] == built.frame["dataset"]).all()
    assert built.problems.total == 0


def test_per_line_reports_stray_images_and_lines_without_references(night, caplog):
    image(f"{night}/tonight/stray.png")
    image(f"{night}/tonight/line_c/0001.png")
    with caplog.at_level("WARNING"):
        built = build_manifest([PlainFolders(queries=(f"{night}/tonight",),
                                             references=(f"{night}/golden",),
                                             folder_per_line=True)])
    assert built.problems.counts == {"ignored_image": 1, "no_references": 1}
    assert f"{night}/tonight/stray.png: image outside any line folder" in caplog.text
    assert "line 'line_c' has queries but no reference images" in caplog.text
    assert "stray.png" not in " ".join(built.frame["image_uri"])


def test_empty_folders_are_reported_once_each(night, caplog):
    os.makedirs(f"{night}/tonight/line_a/cam3")
    os.makedirs(f"{night}/empty_refs")
    with caplog.at_level("WARNING"):
        built = build_manifest([PlainFolders(dataset="a", queries=(f"{night}/tonight/line_a",),
                                             references=(f"{night}/empty_refs",))])
    assert built.problems.counts == {"empty_folder": 2, "no_references": 1}
    assert f"{night}/tonight/line_a/cam3: no images" in caplog.text
    assert f"{night}/empty_refs: no images" in caplog.text


def test_a_folder_that_cannot_be_listed_is_reported(night, monkeypatch, caplog):
    from fsspec.implementations.local import LocalFileSystem

    listing = LocalFileSystem.ls

    def ls(self, path, detail=True, **kwargs):
        if path.endswith("cam2"):
            raise PermissionError(13, "Permission denied", path)
        return listing(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    with caplog.at_level("WARNING"):
        built = build_manifest([PlainFolders(dataset="a", queries=(f"{night}/tonight/line_a",),
                                             references=(f"{night}/golden/line_a",))])
    assert built.problems.counts == {"unreadable": 1}  # once, not again as an empty folder
    assert f"{night}/tonight/line_a/cam2: cannot list this folder" in caplog.text
    assert len(built.frame) == 3  # cam1's image and the two references


def test_symlinks_spaces_and_non_ascii_names_round_trip(tmp_path):
    root = tmp_path / "caméra nuit"
    real = image(root / "elsewhere" / "pièce 01.png")
    image(root / "queries" / "tête de vis 2.png")
    os.symlink(real, root / "queries" / "lien vers pièce.png")
    os.symlink(root / "elsewhere", root / "queries" / "dossier lié")
    image(root / "références" / "bonne pièce.png")
    os.symlink(root / "queries", root / "queries" / "boucle")  # a loop: read once
    out = str(tmp_path / "m.parquet")

    built = build_manifest([PlainFolders(dataset="ligne ä", queries=(str(root / "queries"),),
                                         references=(str(root / "références"),))])
    m.write_manifest(built.frame, out)

    assert built.problems.counts == {"link_loop": 1}  # boucle/ is queries/ again
    rows = [m.normalize_row(r) for r in pd.read_parquet(out).to_dict("records")]
    assert all(isinstance(r, m.ManifestRow) for r in rows)
    assert sorted(r.image_uri for r in rows) == sorted(built.frame["image_uri"])
    assert sorted(os.path.relpath(r.image_uri, root) for r in rows) == [
        "queries/dossier lié/pièce 01.png", "queries/lien vers pièce.png",
        "queries/tête de vis 2.png", "références/bonne pièce.png"]
    for r in rows:  # the names as written (links not resolved) open the images
        assert r.dataset == "ligne ä"
        with open(r.image_uri, "rb") as f:
            assert f.read(4) == b"\x89PNG"


def test_fsspec_urls_stay_urls():
    root = f"memory://night/{uuid.uuid4().hex}"
    for name in ("q/a b.png", "q/sub/c.png", "r/d.png"):
        with fsspec.open(f"{root}/{name}", "wb") as f:
            f.write(b"\x89PNG" + name.encode())
    built = build_manifest([PlainFolders(dataset="d", queries=(f"{root}/q",),
                                         references=(f"{root}/r",))])
    uris = sorted(built.frame["image_uri"])
    assert all(u.startswith("memory://") for u in uris)
    # (the memory filesystem writes its root as memory:///)
    assert [fsspec.core.strip_protocol(u) for u in uris] == [
        fsspec.core.strip_protocol(f"{root}/{n}") for n in ("q/a b.png", "q/sub/c.png", "r/d.png")]
    for uri in built.frame["image_uri"]:
        with fsspec.open(uri, "rb") as f:
            assert f.read(4) == b"\x89PNG"


@pytest.mark.parametrize("kwargs,match", [
    ({"dataset": "a"}, "at least one"),
    ({"queries": ("q",)}, "dataset name"),
    ({"dataset": "a", "queries": ("q",), "folder_per_line": True}, "cannot be given"),
])
def test_bad_plain_folder_sources(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlainFolders(**kwargs)


def test_a_folder_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_manifest([PlainFolders(dataset="a", queries=(str(tmp_path / "nope"),))])


def test_a_lines_references_may_come_from_another_group(night):
    """Queries of a line in one group, its references in another: no warning."""
    built = build_manifest([
        PlainFolders(dataset="a", queries=(f"{night}/tonight/line_a",)),
        PlainFolders(dataset="a", references=(f"{night}/golden/line_a",)),
        PlainFolders(dataset="b", queries=(f"{night}/tonight/line_b",)),
    ])
    assert built.problems.counts == {"no_references": 1}  # line b only
