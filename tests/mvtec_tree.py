"""A small MVTec-layout tree on disk for manifest-building tests."""
from __future__ import annotations

import os


def touch(path, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_mvtec_tree(tmp_path) -> str:
    """Two categories with references, normal and defect queries, masks and stray files."""
    root = tmp_path / "mvtec"
    files = [
        "bottle/train/good/000.png",
        "bottle/train/good/001.PNG",
        "bottle/train/good/notes.txt",
        "bottle/test/good/000.png",
        "bottle/test/broken_large/000.png",
        "bottle/test/broken_large/001.png",
        "bottle/test/contamination/000.jpg",
        "bottle/test/ground_truth/broken_large/000_mask.png",
        "bottle/test/ground_truth/001_mask.png",
        "bottle/ground_truth/broken_large/000_mask.png",
        "cable/train/good/000.bmp",
        "cable/test/cut/000.tiff",
        "docs/readme.png",  # no train/ or test/: not a category
        "license.txt",
    ]
    for f in files:
        touch(str(root / f))
    return str(root)
