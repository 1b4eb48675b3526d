"""Calibrated decisions: which normal images calibrate each group, and each query's decision.

Two steps around the scoring job's one decode → extract → score path:

* :class:`SelectCalibration` (before loading) picks the normal images that calibrate the
  run's groups: the manifest's ``calibration`` rows, and, with the random draw (or k = 0),
  the group's reference candidates, of which each seed uses those its draw did not take.
  A candidate every seed drew is no calibration image for any seed: it is left out before
  loading. They travel with the queries through LoadImages, ExtractSuiteFeatures and
  ScoreQueries,
  marked by :data:`CALIBRATION_KEY` on their rows (and so on their score records), so each
  is decoded once, run once per extractor and scored for every seed and scorer against the
  same k references as the queries. Only groups with queries in the run are calibrated.
  Representative selection takes the pool's most central images as references: what it
  leaves is not exchangeable with the queries, so there only ``calibration`` rows count.
* :class:`DecideAnomalies` (after scoring) drops each calibration record whose image is
  among its own references (a pool image drawn by that seed: never scored against itself),
  collects per (dataset, category, seed, scorer) the calibration scores and, when the run
  computes anomaly maps, the maxima of their maps (:class:`pipeline.core.calibration.
  Calibration`), and gives every query record its decision columns from its group's
  calibration (a side input: the queries stream, only the small calibration sets are
  held). Calibration records are not written: they leave the job here.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.core.calibration import Calibration
from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import ManifestRow
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.core.selection import RowSelection
from transforms.errors import row_error
from transforms.maps import PATCH_MAP_KEY, record_anomaly_map

#: The key marking calibration rows (in ``ManifestRow.extra``) and their score records; its
#: value says where the image came from.
CALIBRATION_KEY = "_calibration"
FROM_CALIBRATION, FROM_POOL = "calibration", "pool"
STAGE_SELECT_CALIBRATION = "select_calibration"
CALIBRATION = "calibration"

GroupKey = tuple[str, str, int, str]  # (dataset, category, seed, scorer)


def is_calibration(record: dict) -> bool:
    """Whether a score record is a calibration image's (not a query's)."""
    return record.get(CALIBRATION_KEY) is not None


def from_pool(error) -> bool:
    """Whether an error row is a pool candidate's, loaded for calibration: such a reference
    is reported by PrepareReferences when a seed draws it, never by the calibration path."""
    return getattr(error, "role", None) == "reference"


class _SelectCalibrationFn(beam.DoFn):
    def __init__(self, selection: RowSelection, pool: bool) -> None:
        self._selection = selection
        self._pool = pool
        self._selected = Metrics.counter(METRICS_NAMESPACE, "calibration_images_selected")

    def _source(self, row: ManifestRow, groups: dict, drawn: dict) -> str | None:
        """Where a calibration image of this run comes from, or None when the row is none:
        a group without a query in the run has nothing to calibrate, and a candidate every
        seed drew as a reference calibrates no seed."""
        group = (row.dataset, row.category)
        if group not in groups:
            return None
        if row.role == "calibration" and self._selection.is_calibration(row):
            return FROM_CALIBRATION
        if (self._pool and row.role == "reference" and row.label != 1
                and self._selection.is_candidate(row) and row.image_id not in drawn.get(group, ())):
            return FROM_POOL
        return None

    def process(self, row: ManifestRow, groups: dict, drawn: dict) -> Iterable:
        source = self._source(row, groups, drawn)
        if source == FROM_CALIBRATION and row.label == 1:
            yield beam.pvalue.TaggedOutput(ERRORS, row_error(
                row, STAGE_SELECT_CALIBRATION, "calibration images must be normal (label 0 "
                "or null), this one is labelled anomalous"))
        elif source is not None:
            self._selected.inc()
            yield dataclasses.replace(row, extra=(*row.extra, (CALIBRATION_KEY, source)))


def _drawn_ids(element) -> tuple[tuple[str, str], tuple[int, tuple[str, ...]]]:
    """((dataset, category, seed), ReferencePayload) → ((dataset, category), (seed, ids))."""
    (dataset, category, seed), payload = element
    return (dataset, category), (seed, tuple(payload.image_ids))


def _drawn_by_every_seed(element) -> tuple[tuple[str, str], frozenset[str]]:
    """((dataset, category), [(seed, ids drawn)]) → the ids every seed's set holds."""
    group, sets = element
    ids = [frozenset(drawn) for _, drawn in sets]
    return group, frozenset.intersection(*ids) if ids else frozenset()


class SelectCalibration(beam.PTransform):
    """ManifestRow → ``{'rows': the calibration images of the groups of ``queries``, marked,
    'errors': RowError}`` (an anomalous-labelled calibration row is an error row).

    ``queries`` is the run's query rows (their (dataset, category) groups are calibrated);
    ``selection`` says which calibration rows and reference candidates the run may use;
    ``reference_sets`` (PrepareReferences' ``sets``: ((dataset, category, seed),
    ReferencePayload)) says which candidates each seed drew.
    """

    def __init__(self, config: ScoreConfig, selection: RowSelection, queries,
                 reference_sets=None) -> None:
        super().__init__()
        self._fn = _SelectCalibrationFn(selection, pool=not config.representative)
        self._queries = queries
        self._sets = reference_sets

    def expand(self, rows):
        groups = (self._queries
                  | "QueryGroups" >> beam.Map(lambda r: (r.dataset, r.category))
                  | "DistinctGroups" >> beam.Distinct()
                  | "AsKeys" >> beam.Map(lambda g: (g, True)))
        sets = (self._sets if self._sets is not None
                else rows.pipeline | "NoSets" >> beam.Create([]))
        drawn = (sets
                 | "DrawnIds" >> beam.Map(_drawn_ids)
                 | "PerGroup" >> beam.GroupByKey()
                 | "DrawnByEverySeed" >> beam.Map(_drawn_by_every_seed))
        out = rows | "Select" >> beam.ParDo(
            self._fn, groups=beam.pvalue.AsDict(groups),
            drawn=beam.pvalue.AsDict(drawn)).with_outputs(ERRORS, main="rows")
        return {"rows": out.rows, ERRORS: out[ERRORS]}


class _SplitFn(beam.DoFn):
    """Query records pass; calibration records go to ``calibration`` as (group, point),
    unless the image is among the record's own references."""

    def __init__(self, config: ScoreConfig) -> None:
        self._config = config
        self._points = Metrics.counter(METRICS_NAMESPACE, "calibration_scores")
        self._own = Metrics.counter(METRICS_NAMESPACE, "calibration_scores_dropped_as_reference")

    def setup(self) -> None:
        self._suite = self._config.suite

    def process(self, record: dict) -> Iterable:
        if not is_calibration(record):
            yield record
        elif (record["image_id"] in (record.get("reference_ids") or ())
              or record["image_uri"] in (record.get("reference_uris") or ())):
            self._own.inc()  # one of its own references: never scored against itself
        else:
            amap = record_anomaly_map(self._suite, record)
            key: GroupKey = (record["dataset"], record["category"], record["seed"],
                             record["scorer"])
            self._points.inc()
            yield beam.pvalue.TaggedOutput(CALIBRATION, (key, (
                record["image_id"], record["final_score"],
                None if amap is None else float(amap.max()))))


def _calibration_of(element, alpha: float) -> tuple[GroupKey, Calibration]:
    """One group's points → its Calibration; an image listed twice (as a calibration row and
    a reference candidate) counts once."""
    key, points = element
    unique = {}
    for image_id, score, peak in sorted(points, key=lambda p: p[0]):
        unique.setdefault(image_id, (score, peak))
    scores = [s for s, _ in unique.values()]
    peaks = [m for _, m in unique.values() if m is not None]
    return key, Calibration.of(alpha, scores, peaks)


class _DecideFn(beam.DoFn):
    def __init__(self, alpha: float) -> None:
        self._alpha = alpha
        self._decided = Metrics.counter(METRICS_NAMESPACE, "queries_decided")
        self._flagged = Metrics.counter(METRICS_NAMESPACE, "queries_flagged")
        self._undecided = Metrics.counter(METRICS_NAMESPACE, "queries_undecided")

    def setup(self) -> None:
        self._empty = Calibration.of(self._alpha)

    def process(self, record: dict, calibrations: dict) -> Iterable:
        key = (record["dataset"], record["category"], record["seed"], record["scorer"])
        calibration = calibrations.get(key, self._empty)
        record.update(calibration.decide(record.get("final_score")))
        has_map = record.get(PATCH_MAP_KEY) is not None
        record["pixel_decision_threshold"] = calibration.pixel_threshold if has_map else None
        if record["is_anomalous"] is None:
            self._undecided.inc()
        else:
            self._decided.inc()
            self._flagged.inc(int(record["is_anomalous"]))
        yield record


class DecideAnomalies(beam.PTransform):
    """Score records of queries and calibration images → the query records, each with its
    decision at ``config.false_alarm_rate`` (``anomaly_p_value``, ``is_anomalous``,
    ``calibration_size``, ``decision_threshold``, ``pixel_decision_threshold``,
    ``false_alarm_rate``); calibration records are consumed.

    Run it before AnomalyMaps: calibration maps are reduced to their maxima here, and the
    query records keep their internal patch-map keys for the maps step (which cuts the
    defect masks of flagged queries).
    """

    def __init__(self, config: ScoreConfig) -> None:
        super().__init__()
        self._config = config

    def expand(self, records):
        alpha = self._config.false_alarm_rate
        split = records | "SplitCalibration" >> beam.ParDo(_SplitFn(self._config)).with_outputs(
            CALIBRATION, main="queries")
        calibrations = (split[CALIBRATION]
                        | "GroupCalibration" >> beam.GroupByKey()
                        | "Calibrate" >> beam.Map(_calibration_of, alpha))
        return split.queries | "Decide" >> beam.ParDo(
            _DecideFn(alpha), calibrations=beam.pvalue.AsDict(calibrations))
