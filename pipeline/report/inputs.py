"""Reading what a report shows: the committed outputs of one date, and earlier nights'
summaries and drift for the history plots.

Everything is read through the commit record in force (:mod:`pipeline.core.layout`), so the
report shows one consistent result: the scores and errors the record names, and the summary,
comparison, drift and ``nightly.json`` files it lists. A file or column that is absent is
``None`` / left out here, never an error: the page says what is missing.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import fsspec
import numpy as np
import pandas as pd

from pipeline.core.layout import (DRIFT, NIGHTLY, current_record, read_partition, record_dates,
                                  to_url)
from pipeline.core.metrics import DEFAULT_SCORER, ordered_scorers
from pipeline.core.schemas import ERRORS, SCORES, SUMMARY

LOG = logging.getLogger(__name__)

SUMMARY_FILE, COMPARISON_FILE = "summary.parquet", "comparison.parquet"
#: The scores columns the report reads (not the patch maps or score components): a column a
#: run did not write reads as nulls, which the page treats as "not recorded".
SCORE_COLUMNS = ("dataset", "category", "image_id", "image_uri", "label", "defect_type", "seed",
                 "scorer", "k", "k_used", "reference_ids", "reference_uris", "final_score",
                 "scoring_mode", "model_id", "backbone", "pretrained", "run_id", "overlay_uri",
                 "anomaly_map_uri", "anomaly_p_value", "is_anomalous", "calibration_size",
                 "decision_threshold", "false_alarm_rate", "defect_mask_uri",
                 "defect_area_fraction", "defect_regions")
DRIFT_FILE, DRIFT_JSON, NIGHTLY_FILE = "drift.parquet", "drift.json", "nightly.json"


class ByDataset:
    """One table's rows per dataset, split once: one stable sort by dataset, then a slice
    per dataset.

    ``by[name]`` holds what ``frame[frame["dataset"].astype(str) == name]`` gives (the rows
    in the table's order, their index kept; an empty frame for a name without rows; a
    missing name matches none, as in the scan) but costs a slice instead of a scan of the
    table: the report asks once per dataset and section, and a scan (or a ``take``) each
    time made a report's cost grow with lines x rows (issue 22). The split happens on first
    use, so a table without a ``dataset`` column raises the same ``KeyError`` the scan did,
    when it is asked. The slices are views: read them, do not write into them.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame
        self._ranges: dict[str, tuple[int, int]] | None = None

    def _split(self) -> dict[str, tuple[int, int]]:
        codes, names = pd.factorize(self._frame["dataset"].astype(str))  # missing: -1
        self._frame = self._frame.take(np.argsort(codes, kind="stable"))
        ends = np.cumsum(np.bincount(codes + 1, minlength=len(names) + 1)).tolist()
        return {str(name): (ends[i], ends[i + 1]) for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if self._ranges is None:
            self._ranges = self._split()
        start, end = self._ranges.get(name, (0, 0))
        return self._frame.iloc[start:end]


@dataclass(frozen=True)
class Night:
    """One date's summary and drift report, for the history plots."""

    date: str
    summary: pd.DataFrame | None
    drift: pd.DataFrame | None
    drift_extra: dict = field(default_factory=dict)

    @cached_property
    def _split(self) -> dict[str, ByDataset]:
        return {name: ByDataset(frame) for name, frame in (("summary", self.summary),
                                                           ("drift", self.drift))
                if frame is not None}

    def rows_of(self, table: str, dataset: str) -> pd.DataFrame | None:
        """The rows of ``table`` (``summary`` or ``drift``) of ``dataset`` (:class:`ByDataset`),
        or None when the night has no such table or it has no ``dataset`` column."""
        frame = self.summary if table == "summary" else self.drift
        if frame is None or "dataset" not in frame.columns:
            return None
        return self._split[table][dataset]


@dataclass(frozen=True)
class RunInputs:
    """The committed outputs of one date, as the report reads them.

    ``scores`` is never None (an empty frame when nothing was scored) and always has a
    ``scorer`` column (rows written before scorers multiplied are InCTRL's); ``errors`` is
    None when the date has no errors table in force. ``scorers`` is the run's scorer order:
    the summary's record of it first, then :func:`ordered_scorers`. ``history`` holds the
    dates up to and including ``run_date`` that have a summary, oldest first.
    """

    output: str
    run_date: str
    scores: pd.DataFrame
    errors: pd.DataFrame | None
    summary: pd.DataFrame | None
    summary_extra: dict
    comparison: pd.DataFrame | None
    drift: pd.DataFrame | None
    drift_extra: dict
    nightly: dict | None
    history: tuple[Night, ...]
    scorers: tuple[str, ...]

    @property
    def datasets(self) -> list[str]:
        """Every dataset with scores, summary rows or errors on this date, sorted."""
        names: set[str] = set()
        for frame in (self.scores, self.errors, self.summary):
            if frame is not None and "dataset" in frame.columns:
                names.update(str(d) for d in frame["dataset"].dropna().unique())
        return sorted(names)

    @cached_property
    def _split(self) -> dict[str, ByDataset]:
        return {name: ByDataset(frame) for name, frame in (("scores", self.scores),
                                                           ("summary", self.summary),
                                                           ("errors", self.errors))
                if frame is not None}

    def rows_of(self, table: str, dataset: str) -> pd.DataFrame:
        """The rows of ``table`` (``scores``, ``summary`` or ``errors``, which must be there)
        of ``dataset``, as the report's per-dataset sections read them (:class:`ByDataset`:
        split once, not scanned per dataset)."""
        if table not in self._split:
            raise ValueError(f"no {table} table on {self.run_date}")
        return self._split[table][dataset]


def committed_file(output: str, run_date: str, table: str, name: str) -> str | None:
    """The URL of report file ``name`` of ``table`` (``summary``, ``drift``, ``nightly``)
    in force for ``run_date`` (the commit record lists it), or None."""
    record = current_record(output, run_date)
    if record is None:
        return None
    for _, rel in record.files(table):
        if posixpath.basename(rel) == name:
            return to_url(output, rel)
    return None


def _read_parquet(url: str | None) -> pd.DataFrame | None:
    if url is None:
        return None
    try:
        with fsspec.open(url, "rb") as f:
            return pd.read_parquet(f)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid, a ValueError
        LOG.warning("Could not read %s (%s); the report leaves it out", url, exc)
        return None


def _read_json(url: str | None) -> dict | None:
    if url is None:
        return None
    try:
        with fsspec.open(url, "r") as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        LOG.warning("Could not read %s (%s); the report leaves it out", url, exc)
        return None
    return value if isinstance(value, dict) else None


def _table(output: str, run_date: str, table: str,
           columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    data = read_partition(output, run_date, table, columns)
    return None if data is None else data.to_pandas()


def _with_scorer(scores: pd.DataFrame) -> pd.DataFrame:
    if "scorer" not in scores.columns:
        return scores.assign(scorer=DEFAULT_SCORER)
    scorer = scores["scorer"].astype(object)
    return scores.assign(scorer=scorer.where(scorer.notna(), DEFAULT_SCORER))


def _scorer_order(extra: dict, scores: pd.DataFrame, summary: pd.DataFrame | None
                  ) -> tuple[str, ...]:
    """The run's scorers: as its summary recorded them, then any other scorer with rows."""
    recorded = [str(s) for s in extra.get("scorers") or () if s is not None]
    present = set(scores["scorer"].dropna().astype(str))
    if summary is not None and "scorer" in summary.columns:
        present |= set(summary["scorer"].dropna().astype(str))
    rest = [s for s in ordered_scorers(present) if s not in recorded]
    return tuple(s for s in recorded if s in present or not present) + tuple(rest)


def _dates(output: str) -> set[str]:
    """Dates that may have a summary: those with commit records."""
    return set(record_dates(output))


def _night(output: str, date: str) -> Night:
    drift_json = _read_json(committed_file(output, date, DRIFT, DRIFT_JSON)) or {}
    return Night(date, _read_parquet(committed_file(output, date, SUMMARY, SUMMARY_FILE)),
                 _read_parquet(committed_file(output, date, DRIFT, DRIFT_FILE)),
                 drift_json.get("extra") or {})


def _history(output: str, run_date: str, nights: int, today: Night) -> tuple[Night, ...]:
    """The last ``nights`` dates up to ``run_date`` (``today``) with a summary or a drift
    report, oldest first; earlier dates are read newest first until enough are found."""
    if nights <= 0:
        return ()
    found: list[Night] = []
    for date in sorted((d for d in _dates(output) if d < run_date), reverse=True):
        if len(found) >= nights - 1:
            break
        night = _night(output, date)
        if night.summary is not None or night.drift is not None:
            found.append(night)
    return tuple(reversed(found)) + (today,)


def read_inputs(output: str, run_date: str, *, history_nights: int = 14) -> RunInputs:
    """The committed outputs of ``run_date`` under ``output`` and the summaries and drift of
    the ``history_nights`` nights up to it."""
    scores = _table(output, run_date, SCORES, SCORE_COLUMNS)
    scores = _with_scorer(scores if scores is not None else pd.DataFrame(
        columns=["dataset", "final_score", "seed", "label", "scorer"]))
    summary = _read_parquet(committed_file(output, run_date, SUMMARY, SUMMARY_FILE))
    summary_json = _read_json(committed_file(output, run_date, SUMMARY, "summary.json")) or {}
    extra: dict[str, Any] = summary_json.get("extra") or {}
    if summary is not None:
        summary = _with_scorer(summary)
    drift = _read_parquet(committed_file(output, run_date, DRIFT, DRIFT_FILE))
    drift_extra = (_read_json(committed_file(output, run_date, DRIFT, DRIFT_JSON)) or {}
                   ).get("extra") or {}
    today = Night(run_date, summary, drift, drift_extra)
    return RunInputs(
        output=output, run_date=run_date, scores=scores,
        errors=_table(output, run_date, ERRORS), summary=summary, summary_extra=extra,
        comparison=_read_parquet(committed_file(output, run_date, SUMMARY, COMPARISON_FILE)),
        drift=drift, drift_extra=drift_extra,
        nightly=_read_json(committed_file(output, run_date, NIGHTLY, NIGHTLY_FILE)),
        history=_history(output, run_date, history_nights, today),
        scorers=_scorer_order(extra, scores, summary))
