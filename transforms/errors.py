"""Error rows: every failure becomes a row a user can read, never a lost element."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

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
    error: RowError, seeds: Iterable[int], model_ids: Mapping[str, str], run_id: str,
    seed: Optional[int] = None, scorer: Optional[str] = None,
) -> list[dict[str, Any]]:
    """Output rows for one error: one per (seed, scorer) for queries (so every query row
    reconciles once per seed and scorer), each with its scorer's ``model_id``; one with a
    null seed, scorer and model id for anything else. ``model_ids``: the run's scorers and
    what produced each one's rows. ``seed`` and ``scorer`` pin a failure to one seed or one
    scorer."""
    base = dict(error.to_record(), run_id=run_id)
    # A row rejected while reading keeps its role as written ("Query"); valid rows are lower-cased.
    if (error.role or "").strip().lower() != "query" and seed is None:
        return [dict(base, seed=None, scorer=None, model_id=None)]
    seeds = [seed] if seed is not None else list(seeds)
    scorers = [scorer] if scorer is not None else list(model_ids)
    return [dict(base, seed=s, scorer=name, model_id=model_ids.get(name))
            for s in seeds for name in scorers]
