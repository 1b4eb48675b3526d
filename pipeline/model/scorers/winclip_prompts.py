"""WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, Sec. 4.1 and appendix).

Pure string functions. Every state word (an object in a normal or an anomalous state) is
placed into every template; each side's prompts are later encoded and averaged into one
class embedding (``winclip.winclip_text_features``).
"""
from __future__ import annotations

from pipeline.model.prompts import object_name

#: state words of the normal side, ``{}`` = the object name
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
#: state words of the anomalous side
ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
#: the template list, ``{}`` = a state word filled with the object name
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def compose(states: tuple[str, ...], name: str,
            templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every state (filled with ``name``) inside every template, states outermost."""
    return [t.format(s.format(name)) for s in states for t in templates]


def prompt_ensemble(category: str) -> tuple[list[str], list[str]]:
    """WinCLIP's normal and anomalous prompts for a category id (``metal_nut`` → "metal nut").

    returns (normal prompts: 7 × 22, anomalous prompts: 4 × 22)
    """
    name = object_name(category)
    if not name:
        raise ValueError(f"a category needs a name, got {category!r}")
    return compose(NORMAL_STATES, name), compose(ANOMALOUS_STATES, name)
