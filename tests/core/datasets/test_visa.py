"""VisA as published: ``split_csv/1cls.csv`` over the original folders, no conversion.

Folder and CSV layout from amazon-science/spot-diff (``split_csv/1cls.csv``: ``object,
split,label,image,mask`` with paths such as ``candle/Data/Images/Normal/0836.JPG``;
``utils/prepare_data.py`` reads it the same way: train/test, normal/anomaly).
"""
from __future__ import annotations

import pytest

from pipeline.core.make_manifest import DatasetRoot, build_manifest
from tests.core.datasets.helpers import rows_of
from tests.dataset_trees import make_visa, text

@pytest.fixture
def visa(tmp_path) -> str:
    return make_visa(tmp_path)


def test_visa_reads_the_one_class_split_with_masks(visa):
    built = build_manifest([DatasetRoot(visa)])

    assert built.layouts == [(visa, "visa")]
    assert set(built.frame["dataset"]) == {"VisA_20220922"}
    assert rows_of(built.frame, visa) == {
        ("candle/Data/Images/Normal/0836.JPG", "candle", "reference", 0, None, None),
        ("candle/Data/Images/Normal/0451.JPG", "candle", "reference", 0, None, None),
        ("candle/Data/Images/Normal/0000.JPG", "candle", "query", 0, None, None),
        ("candle/Data/Images/Anomaly/000.JPG", "candle", "query", 1, "anomaly",
         "candle/Data/Masks/Anomaly/000.png"),
        ("pcb1/Data/Images/Normal/0000.JPG", "pcb1", "reference", 0, None, None),
        ("pcb1/Data/Images/Anomaly/012.JPG", "pcb1", "query", 1, "anomaly",
         "pcb1/Data/Masks/Anomaly/012.png"),
    }
    assert built.problems.total == 0


def test_visa_reports_bad_rows_and_missing_files(visa, caplog):
    with open(f"{visa}/split_csv/1cls.csv", "a", encoding="utf-8") as f:
        f.write("candle,val,normal,candle/Data/Images/Normal/0999.JPG,\n"
                "candle,test,normal,candle/Data/Images/Normal/gone.JPG,\n"
                "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/012.JPG,pcb1/Data/Masks/x.png\n")

    with caplog.at_level("WARNING"):
        built = build_manifest([DatasetRoot(visa)])

    assert built.problems.counts == {"bad_entry": 1, "missing": 2}
    assert "1cls.csv line 8" in caplog.text and "'val'" in caplog.text
    assert "Normal/gone.JPG" in caplog.text and "pcb1/Data/Masks/x.png" in caplog.text
    # The row whose mask is missing is still there, without a mask.
    uris = built.frame.loc[built.frame["mask_uri"].isna(), "image_uri"].tolist()
    assert sum(u.endswith("Anomaly/012.JPG") for u in uris) == 1


def test_visa_csv_without_its_columns_is_an_error(tmp_path):
    root = tmp_path / "visa"
    text(root / "split_csv/1cls.csv", "object,image\ncandle,a.JPG\n")
    with pytest.raises(ValueError, match="lacks column.*split.*label.*mask"):
        build_manifest([DatasetRoot(str(root))])
