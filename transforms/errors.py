"""Error rows: every failure becomes a row a user can read, never a lost element."""
from __future__ import annotations

from typing import Any, Iterable, Optional

from pipeline.core.manifest import ManifestRow, RowError


def row_error(row: ManifestRow, stage: str, reason: str) -> RowError:
    """A RowError for a valid manifest row that failed at a later stage."""
    return RowError(
        image_uri=row.image_uri,
        dataset=row.dataset,
        category=row.category,
        image_id=row.image_id,
        role=row.role,
        stage=stage,
        reason=reason,
    )


def error_records(
    error: RowError, seeds: Iterable[int], run_id: str, model_id: str,
    seed: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Output rows for one error: one per seed for queries (so every query row reconciles once
    per seed), one with a null seed for anything else; ``seed`` pins a seed-specific failure."""
    base = dict(error.to_record(), run_id=run_id, model_id=model_id)
    if seed is not None:
        return [dict(base, seed=seed)]
    # A row rejected while reading keeps its role as written ("Query"); valid rows are lower-cased.
    if (error.role or "").strip().lower() == "query":
        return [dict(base, seed=s) for s in seeds]
    return [dict(base, seed=None)]
