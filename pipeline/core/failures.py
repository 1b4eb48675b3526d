"""How much of a run failed, and whether that is too much to commit.

Every (query, seed, scorer) row a run answers for is either scored or an error row. A run
whose failed fraction is above ``--max-failed-fraction`` is a systematic failure (a broken
model, a wrong path): it does not commit, the record in force stays, and the command exits
with :data:`EXIT_TOO_MANY_FAILURES` naming the most common reason. Below it the run commits
and its summary says how many rows failed.

Error rows of the stages in :data:`KEEPS_SCORES` keep their scores (a mask that could not be
read, a map that could not be written): they are not failed rows.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pipeline.core.layout import output_fs

#: Error stages whose rows are still scored (pixel metrics and map files only).
STAGE_MASK = "read_mask"
STAGE_MAP = "write_map"
KEEPS_SCORES = frozenset({STAGE_MASK, STAGE_MAP})

#: Default of ``--max-failed-fraction``.
DEFAULT_MAX_FAILED_FRACTION = 0.05
#: Exit status of a run refused for too many failed rows (0-4 are taken, see pipeline.cli).
EXIT_TOO_MANY_FAILURES = 5
#: The refusal marker, in the run's staging folder; the launcher reads it after the job.
REFUSAL_FILE = "refused.json"
#: Reasons a tally keeps (the most frequent), so that it stays small whatever fails.
_KEEP_REASONS = 100


def counts_as_failed(record: Mapping[str, Any]) -> bool:
    """Whether an error record is a failed (query, seed, scorer) row: it has a seed (query
    rows have one; reference and manifest failures appear once, without) and its stage
    does not keep the row's scores."""
    return record.get("seed") is not None and record.get("stage") not in KEEPS_SCORES


def check_fraction(value: float) -> float:
    """A valid ``max_failed_fraction`` (0 to 1), or ValueError."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"max_failed_fraction must be between 0 and 1, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FailureTally:
    """Rows scored and rows failed by one run, with the failed rows' most frequent reasons
    (``(reason, rows)``, most frequent first)."""

    scored: int = 0
    failed: int = 0
    reasons: tuple[tuple[str, int], ...] = ()

    @property
    def expected(self) -> int:
        """The (query, seed, scorer) rows the run answers for."""
        return self.scored + self.failed

    @property
    def fraction(self) -> float:
        """Failed rows over expected rows (0 when the run expected none)."""
        return self.failed / self.expected if self.expected else 0.0

    @property
    def most_common_reason(self) -> str | None:
        return self.reasons[0][0] if self.reasons else None

    def refused(self, max_fraction: float) -> bool:
        return self.fraction > max_fraction

    def to_json(self) -> dict:
        return {"scored": self.scored, "failed": self.failed,
                "reasons": [list(r) for r in self.reasons]}

    @staticmethod
    def from_json(obj: Mapping) -> "FailureTally":
        return FailureTally(int(obj["scored"]), int(obj["failed"]),
                            tuple((str(r), int(n)) for r, n in obj.get("reasons", ())))

    @staticmethod
    def of(scored: int, failed_reasons: Mapping[str, int] | Iterable[tuple[str, int]]
           ) -> "FailureTally":
        counts = Counter(dict(failed_reasons))
        top = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_KEEP_REASONS])
        return FailureTally(scored, sum(counts.values()), top)


class TooManyFailures(RuntimeError):
    """A run failed more rows than ``--max-failed-fraction`` allows: nothing was committed."""

    def __init__(self, tally: FailureTally, max_fraction: float, run_date: str) -> None:
        self.tally = tally
        super().__init__(
            f"{tally.failed} of {tally.expected} (query, seed, scorer) rows failed "
            f"({tally.fraction:.1%}, above --max-failed-fraction {max_fraction:g}); the run "
            f"of {run_date} was not committed and the record in force stays. Most common "
            f"reason: {tally.most_common_reason}")


def refusal_path(output: str, staging: str) -> str:
    """The refusal marker of the run whose staging folder is ``staging`` (relative)."""
    _, root = output_fs(output)
    return f"{root}/{staging}/{REFUSAL_FILE}"


def write_refusal(output: str, staging: str, tally: FailureTally, max_fraction: float) -> None:
    """Leave the marker that says this run must not commit (read by :func:`read_refusal`)."""
    fs, _ = output_fs(output)
    path = refusal_path(output, staging)
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(json.dumps({"tally": tally.to_json(), "max_failed_fraction": max_fraction}
                           ).encode())


def read_refusal(output: str, staging: str) -> tuple[FailureTally, float] | None:
    """The refusal a run's commit step left, or None when it did not refuse."""
    fs, _ = output_fs(output)
    path = refusal_path(output, staging)
    fs.invalidate_cache(path.rpartition("/")[0])
    try:
        with fs.open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        return None
    return FailureTally.from_json(obj["tally"]), float(obj["max_failed_fraction"])


__all__ = ["DEFAULT_MAX_FAILED_FRACTION", "EXIT_TOO_MANY_FAILURES", "FailureTally",
           "KEEPS_SCORES", "REFUSAL_FILE", "STAGE_MAP", "STAGE_MASK", "TooManyFailures",
           "check_fraction", "counts_as_failed", "read_refusal", "refusal_path",
           "write_refusal"]
