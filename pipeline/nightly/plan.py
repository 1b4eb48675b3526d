"""What a night scores: the date's queries in the manifest, and the plan that says which of
them still need a score and which rows of the date's earlier run are kept.

:func:`plan_night` is pure pandas/numpy; :func:`date_queries` is its one read, of the manifest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.core.manifest import ManifestRow, ManifestSchemaError, manifest_files, normalize_row
from pipeline.core.selection import RowSelection
from pipeline.model.scorers.inctrl import INCTRL

LOG = logging.getLogger(__name__)

DATE_COLUMN = "capture_date"


@dataclass(frozen=True)
class NightPlan:
    """The night's work: which queries to score and which existing rows to keep."""

    queries: int  # queries captured on the date
    skip: frozenset[tuple[str, str]]  # (dataset, image_id) already scored: not scored again
    carry: np.ndarray  # bool per existing row: kept in the new partition
    existing_rows: int

    @property
    def to_score(self) -> int:
        return self.queries - len(self.skip)

    @property
    def carried_rows(self) -> int:
        return int(self.carry.sum())

    @property
    def dropped_rows(self) -> int:
        return self.existing_rows - self.carried_rows

    @property
    def up_to_date(self) -> bool:
        """Nothing to score and nothing to drop: the partition already is tonight's result."""
        return self.to_score == 0 and self.dropped_rows == 0


#: Rows written before the scorer column existed were all InCTRL's.
LEGACY_SCORER = INCTRL


def plan_night(date_queries: Iterable[tuple[str, str]], existing: pd.DataFrame, *,
               model_ids: Mapping[str, str], k: int, seeds: Sequence[int],
               force: bool = False, false_alarm_rate: float | None = None) -> NightPlan:
    """Which of the date's queries ((dataset, image_id) pairs) are done, and which existing
    rows carry over.

    ``existing`` holds the date's current rows with at least ``dataset``, ``image_id``,
    ``seed``, ``model_id`` and ``k`` (and ``scorer``; rows without one are InCTRL's, written
    before the column existed). ``model_ids`` maps each scorer of the run to the model id
    its rows must show (``SuiteSpec.model_ids``). With ``false_alarm_rate``, a row counts
    only when it was decided at that rate (rows written before decisions existed, or at
    another rate, are scored again). A query is done when it has a row for every (seed,
    scorer) with that scorer's model id and this ``k``; only the done queries'
    rows for those are kept (one per (dataset, image_id, seed, scorer)). The same image may
    be a query of several datasets: each is planned on its own. ``force`` keeps nothing
    and rescores everything.
    """
    wanted = set(date_queries)
    n = len(existing)
    if force or n == 0:
        return NightPlan(len(wanted), frozenset(), np.zeros(n, dtype=bool), n)
    seeds = set(seeds)
    keys = pd.Series(list(zip(existing["dataset"], existing["image_id"])), index=existing.index,
                     dtype=object)
    scorer = (existing["scorer"].fillna(LEGACY_SCORER) if "scorer" in existing.columns
              else pd.Series(LEGACY_SCORER, index=existing.index))
    expected = scorer.map(dict(model_ids))  # NaN for scorers not in the run
    match = (
        keys.isin(wanted).to_numpy()
        & existing["seed"].isin(seeds).to_numpy()
        & (existing["model_id"] == expected).to_numpy()
        & (existing["k"] == k).to_numpy()
    )
    if false_alarm_rate is not None:
        rate = (existing["false_alarm_rate"] if "false_alarm_rate" in existing.columns
                else pd.Series(np.nan, index=existing.index))
        match &= (pd.to_numeric(rate, errors="coerce") == false_alarm_rate).to_numpy(dtype=bool)
    frame = existing.assign(scorer=scorer)
    rows = np.flatnonzero(match)
    unique = rows[~frame.iloc[rows].duplicated(
        subset=["dataset", "image_id", "seed", "scorer"]).to_numpy()]
    match = np.zeros(n, dtype=bool)
    match[unique] = True  # one row per (dataset, image_id, seed, scorer)
    # rows are now distinct per (seed, scorer): a query's count is its distinct pairs
    pairs = frame[match].groupby(["dataset", "image_id"]).size()
    done = frozenset(pairs.index[pairs == len(seeds) * len(model_ids)])
    carry = match & keys.isin(done).to_numpy()
    return NightPlan(len(wanted), done, carry, n)


def date_queries(manifest: str, schema: pa.Schema, date: str) -> frozenset[tuple[str, str]]:
    """(dataset, image_id) of the manifest's valid queries captured on ``date``: the rows
    ``RowSelection(query_date=date)`` lets through, before any is skipped."""
    if DATE_COLUMN not in schema.names:
        raise ManifestSchemaError(
            f"the nightly run needs a {DATE_COLUMN!r} column (date, timestamp or 'YYYY-MM-DD') "
            f"to pick the queries of a date; manifest {manifest} has none")
    fs, _ = fsspec.core.url_to_fs(manifest)
    files = [fsspec.core.url_to_fs(f)[1] for f in manifest_files(manifest)]
    columns = [c for c in ("image_uri", "image_id", "dataset", "category", "role", DATE_COLUMN)
               if c in schema.names]
    data = pads.dataset(files, filesystem=fs, format="parquet", schema=schema)
    selection = RowSelection(query_date=date)
    found: set[tuple[str, str]] = set()
    for batch in data.to_batches(columns=columns):
        for raw in batch.to_pylist():
            row = normalize_row(raw)
            if isinstance(row, ManifestRow) and selection.is_query(row):
                found.add((row.dataset, row.image_id))
    return frozenset(found)
