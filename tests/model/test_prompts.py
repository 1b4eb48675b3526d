"""pipeline.model.prompts against the prompt ensemble of the InCTRL paper / official code."""
from __future__ import annotations

import pytest

from pipeline.model.prompts import (
    TEMPLATES,
    object_name,
    prompts_for,
    semantic_prompts,
    state_prompts,
)

# Typed out from InCTRL's released code (state_level / template_level).
OFFICIAL_NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}",
                   "{} without flaw", "{} without defect", "{} without damage"]
OFFICIAL_ANOMALOUS = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
OFFICIAL_TEMPLATES = [
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of a {}.", "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of the {}.", "a photo of a {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a {} for visual inspection.", "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.", "a photo of the {} for anomaly detection.",
]


def test_templates_are_the_official_22():
    assert len(TEMPLATES) == 22
    assert len(set(TEMPLATES)) == 22
    assert set(TEMPLATES) == set(OFFICIAL_TEMPLATES)


def test_state_ensemble_sizes_and_content():
    normal, anomalous = state_prompts("metal_nut")
    assert len(normal) == 7 * 22 == 154
    assert len(anomalous) == 4 * 22 == 88
    assert len(set(normal)) == 154 and len(set(anomalous)) == 88
    assert set(normal) == {t.format(s.format("metal nut"))
                           for s in OFFICIAL_NORMAL for t in OFFICIAL_TEMPLATES}
    assert set(anomalous) == {t.format(s.format("metal nut"))
                              for s in OFFICIAL_ANOMALOUS for t in OFFICIAL_TEMPLATES}
    assert not set(normal) & set(anomalous)


def test_exact_entries():
    normal, anomalous = state_prompts("metal_nut")
    assert "a cropped photo of the flawless metal nut." in normal
    assert "a photo of a metal nut without defect for anomaly detection." in normal
    assert "a photo of the small unblemished metal nut." in normal
    assert "a blurry photo of a damaged metal nut." in anomalous
    assert "a photo of a metal nut with defect for anomaly detection." in anomalous
    assert "a jpeg corrupted photo of the metal nut with damage." in anomalous


def test_underscores_become_spaces():
    assert object_name("metal_nut") == "metal nut"
    assert object_name("pcb_1") == "pcb 1"
    normal, anomalous = prompts_for("pipe_fryum")
    for p in normal + anomalous:
        assert "_" not in p and "{" not in p and "}" not in p
        assert "pipe fryum" in p


@pytest.mark.parametrize("name", ["dog", "airplane", "truck", "animal"])
def test_semantic_class_gets_the_single_pair(name):
    normal, anomalous = prompts_for(name)
    assert normal == [f"a photo of {name} for anomaly detection."]
    assert anomalous == [f"a photo without {name} for anomaly detection."]


def test_semantic_pair_exact_for_dog():
    assert prompts_for("dog") == (["a photo of dog for anomaly detection."],
                                  ["a photo without dog for anomaly detection."])
    assert semantic_prompts("dog") == prompts_for("dog")


def test_object_categories_get_the_ensemble():
    normal, anomalous = prompts_for("bottle")
    assert (len(normal), len(anomalous)) == (154, 88)
    assert prompts_for("bottle") == state_prompts("bottle")


def test_custom_semantic_classes():
    normal, anomalous = prompts_for("toy_brick", semantic_classes=frozenset({"toy brick"}))
    assert normal == ["a photo of toy brick for anomaly detection."]
    assert anomalous == ["a photo without toy brick for anomaly detection."]
    assert len(prompts_for("dog", semantic_classes=frozenset())[0]) == 154
