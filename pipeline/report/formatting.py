"""How numbers and labels read on the run report: one place, so a test can compare the page's
text with the summary it came from."""
from __future__ import annotations

import math
from typing import Any

#: What a missing value reads as (the same words as ``summary.md``).
MISSING = "n/a"
#: Label values of the scores table and the words the report uses for them.
NORMAL, ANOMALOUS = 0, 1
LABEL_NAMES = {NORMAL: "normal", ANOMALOUS: "anomalous"}
UNLABELLED = "unlabelled"


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def format_value(value: Any) -> str:
    """A metric value with three decimals, ``n/a`` when missing or not a number."""
    return MISSING if _missing(value) else f"{float(value):.3f}"


def format_metric(mean: Any, std: Any) -> str:
    """A metric over seeds as the report shows it: ``0.912 ± 0.013``.

    Just the mean when the std is missing and ``n/a`` when the mean is (``None``, NaN or
    not a number): the same rule as the summary's Markdown table.
    """
    if _missing(mean):
        return MISSING
    if _missing(std):
        return format_value(mean)
    return f"{format_value(mean)} ± {format_value(std)}"


def format_score(value: Any) -> str:
    """An anomaly score with four significant digits (scorers' scales differ by orders of
    magnitude, so fixed decimals would print 0.000 for some)."""
    return MISSING if _missing(value) else f"{float(value):.4g}"


def format_percent(fraction: Any) -> str:
    """A fraction as a percentage with one decimal: ``0.125`` → ``12.5 %``."""
    return MISSING if _missing(fraction) else f"{100 * float(fraction):.1f} %"


def label_name(label: Any) -> str:
    """``normal`` / ``anomalous`` for labels 0 / 1, ``unlabelled`` for a missing label."""
    if _missing(label):
        return UNLABELLED
    return LABEL_NAMES.get(int(label), str(label))
