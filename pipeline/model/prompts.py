"""InCTRL's text prompts as pure string functions."""
from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")

_ADJECTIVES = ("cropped", "close-up", "bright", "dark", "jpeg corrupted", "blurry")
_ARTICLES = ("a", "the")
_SIZES = ("", "small ", "large ")
_PURPOSES = ("visual inspection", "anomaly detection")

TEMPLATES = tuple(
    [f"a {adj} photo of {art} {{}}." for adj in _ADJECTIVES for art in _ARTICLES]
    + [f"a photo of {art} {size}{{}}." for art in _ARTICLES for size in _SIZES]
    + [f"a photo of {art} {{}} for {p}." for art in _ARTICLES for p in _PURPOSES]
)

SEMANTIC_NORMAL = "a photo of {} for anomaly detection."
SEMANTIC_ANOMALOUS = "a photo without {} for anomaly detection."

# The class names InCTRL scores with the semantic prompt pair (CIFAR-10 and its one-vs-rest use).
DEFAULT_SEMANTIC_CLASSES = frozenset(
    {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
     "animal"}
)


def object_name(category: str) -> str:
    """A category id as words: ``metal_nut`` → ``metal nut``."""
    return category.replace("_", " ").strip()


def state_prompts(category: str) -> tuple[list[str], list[str]]:
    """The full ensemble: every state inside every template, for the normal and anomalous side."""
    name = object_name(category)
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def semantic_prompts(category: str) -> tuple[list[str], list[str]]:
    """The single pair used when the category is a class name (semantic anomaly detection)."""
    name = object_name(category)
    return [SEMANTIC_NORMAL.format(name)], [SEMANTIC_ANOMALOUS.format(name)]


def prompts_for(
    category: str, semantic_classes: frozenset[str] = DEFAULT_SEMANTIC_CLASSES
) -> tuple[list[str], list[str]]:
    """Normal and anomalous prompts for a category, semantic pair for known class names."""
    if object_name(category) in semantic_classes or category in semantic_classes:
        return semantic_prompts(category)
    return state_prompts(category)
