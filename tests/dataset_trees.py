"""Small image files for the dataset-layout tests: real PNG / JPEG images and masks of
chosen sizes, so that make-manifest's header reads and mask unions have something to read."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

#: (width, height) of every test image unless a test says otherwise.
SIZE = (8, 6)


def image(path, size: tuple[int, int] = SIZE, value: int = 128) -> str:
    """An RGB image of one colour; the format follows the extension (``.JPG`` → JPEG)."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def mask(path, size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] = (0, 0, 2, 2),
         value: int = 255) -> str:
    """A grayscale mask: ``value`` inside ``box`` (x0, y0, x1, y1, end exclusive), 0 elsewhere."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = value
    Image.fromarray(pixels, mode="L").save(path)
    return path


def text(path, content: str = "x") -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(content)
    return path


# --------------------------------------------------------------------------------------------
# Miniature trees with the published folder and file names (sources in each layout's test)
# --------------------------------------------------------------------------------------------

VISA_CSV = """object,split,label,image,mask
candle,train,normal,candle/Data/Images/Normal/0836.JPG,
candle,train,normal,candle/Data/Images/Normal/0451.JPG,
candle,test,normal,candle/Data/Images/Normal/0000.JPG,
candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png
pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,
pcb1,test,anomaly,pcb1/Data/Images/Anomaly/012.JPG,pcb1/Data/Masks/Anomaly/012.png
"""


def make_visa(tmp_path) -> str:
    """VisA as published: object folders and split_csv/1cls.csv."""
    root = tmp_path / "VisA_20220922"
    for name in ("candle/Data/Images/Normal/0836.JPG", "candle/Data/Images/Normal/0451.JPG",
                 "candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Anomaly/000.JPG",
                 "pcb1/Data/Images/Normal/0000.JPG", "pcb1/Data/Images/Anomaly/012.JPG",
                 "candle/Data/Images/Normal/0999.JPG"):  # on disk, not in the split: no row
        image(root / name)
    mask(root / "candle/Data/Masks/Anomaly/000.png", value=1)  # VisA masks are class indices
    mask(root / "pcb1/Data/Masks/Anomaly/012.png")
    text(root / "candle/image_anno.csv", "image,label,mask\n")
    text(root / "split_csv/1cls.csv", VISA_CSV)
    text(root / "split_csv/2cls_fewshot.csv", "object,split,label,image,mask\n")
    return str(root)


def make_loco(tmp_path) -> str:
    """MVTec LOCO AD: two categories, one anomalous image with two mask PNGs."""
    root = tmp_path / "mvtec_loco_anomaly_detection"
    for name in ("breakfast_box/train/good/000.png", "breakfast_box/train/good/001.png",
                 "breakfast_box/validation/good/000.png", "breakfast_box/test/good/000.png",
                 "breakfast_box/test/logical_anomalies/000.png",
                 "breakfast_box/test/logical_anomalies/001.png",
                 "breakfast_box/test/structural_anomalies/000.png",
                 "juice_bottle/train/good/000.png",
                 "juice_bottle/test/structural_anomalies/000.png"):
        image(root / name)
    # Two regions of one logical anomaly: two PNGs, combined into one mask.
    mask(root / "breakfast_box/ground_truth/logical_anomalies/000/000.png", box=(0, 0, 2, 2))
    mask(root / "breakfast_box/ground_truth/logical_anomalies/000/001.png", box=(5, 3, 8, 6),
         value=7)
    mask(root / "breakfast_box/ground_truth/logical_anomalies/001/000.png")
    mask(root / "breakfast_box/ground_truth/structural_anomalies/000/000.png")
    mask(root / "juice_bottle/ground_truth/structural_anomalies/000/000.png")
    text(root / "breakfast_box/defects_config.json", "[]")
    text(root / "license.txt")
    text(root / "readme.txt")
    return str(root)


def make_ad2(tmp_path) -> str:
    """MVTec AD 2: public test set with masks and both private test sets."""
    root = tmp_path / "mvtec_ad_2"
    for name in ("can/train/good/000_regular.png", "can/validation/good/000_regular.png",
                 "can/test_public/good/000_regular.png", "can/test_public/bad/000_regular.png",
                 "can/test_public/bad/001_regular.png", "can/test_private/000_regular.png",
                 "can/test_private_mixed/000_overexposed.png",
                 "vial/train/good/000_regular.png", "vial/test_public/good/000_regular.png"):
        image(root / name)
    mask(root / "can/test_public/ground_truth/bad/000_regular_mask.png")
    mask(root / "can/test_public/ground_truth/bad/001_regular_mask.png")
    return str(root)


REALIAD_OK1 = "OK/S0001/audiojack_0001_OK_C1_20230922093206.jpg"
REALIAD_OK2 = "OK/S0001/audiojack_0001_OK_C2_20230922093206.jpg"
REALIAD_NG1 = "NG/BX/S0002/audiojack_0002_NG_C1_20230922093311.jpg"
# The reader takes each mask's name from the entry's mask_path, whatever its form.
REALIAD_NG1_MASK = "NG/BX/S0002/audiojack_0002_NG_C1_20230922093311.png"
REALIAD_NG2 = "NG/BX/S0002/audiojack_0002_NG_C2_20230922093311.jpg"  # defect not in view
REALIAD_TEST_OK = "OK/S0003/audiojack_0003_OK_C1_20230922093402.jpg"
REALIAD_IMAGES = (REALIAD_OK1, REALIAD_OK2, REALIAD_NG1, REALIAD_NG2, REALIAD_TEST_OK)


def realiad_entry(path, cls="OK", mask_path=None, category="audiojack") -> dict:
    return {"category": category, "anomaly_class": cls, "image_path": path,
            "mask_path": mask_path}


def make_realiad(tmp_path) -> str:
    """Real-IAD: one category, two samples of two views and one of one, two split sets."""
    root = tmp_path / "Real-IAD"
    base = root / "realiad_1024" / "audiojack"
    for name in REALIAD_IMAGES:
        image(base / name)
    mask(base / REALIAD_NG1_MASK)
    doc = {"meta": {"prefix": "audiojack/", "normal_class": "OK"},
           "train": [realiad_entry(REALIAD_OK1), realiad_entry(REALIAD_OK2)],
           "test": [realiad_entry(REALIAD_NG1, "BX", REALIAD_NG1_MASK),
                    realiad_entry(REALIAD_NG2, "OK"), realiad_entry(REALIAD_TEST_OK)]}
    text(root / "realiad_jsons" / "audiojack.json", json.dumps(doc))
    text(root / "realiad_jsons_sv" / "audiojack.json", json.dumps(dict(
        doc, train=[realiad_entry(REALIAD_OK1)],
        test=[realiad_entry(REALIAD_NG1, "BX", REALIAD_NG1_MASK)])))
    return str(root)
