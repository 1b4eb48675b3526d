"""WriteOutputs: a run's scores, errors and summary, staged and committed together."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam import pvalue

from pipeline.core.commit import CommitPlan, relative
from pipeline.core.config import ScoreConfig
from pipeline.core.layout import unstorable_reason
from pipeline.core.schemas import ERROR_SCHEMA, ERRORS, SCORES, SUMMARY, scores_schema
from pipeline.model.scorers.inctrl import INCTRL
from transforms.errors import error_records
from transforms.failures import TallyFailures
from transforms.maps import FILES, PIXEL, AnomalyMaps, CarriedPixelStats
from transforms.summary import SummarizeMetrics
from transforms.write import REPORT, CommitStaged, StageFiles

#: Keys of WriteOutputs' input whose elements are RowErrors (not yet error records).
ROW_ERRORS = ("manifest_errors", "reference_errors", "image_errors", "calibration_errors")
#: The stage of error rows for rows whose dataset name cannot be stored as a folder.
WRITE_STAGE = "write"


class _CheckDatasetFn(beam.DoFn):
    """Records whose dataset can be a folder pass; the others become error rows (stage
    ``write``, in the null-dataset partition) on the ``errors`` output, so that a name that
    cannot be stored is reported, never merged with another."""

    def __init__(self, table: str) -> None:
        self._table = table

    def process(self, record: dict) -> Iterable:
        reason = unstorable_reason("dataset", record.get("dataset"))
        if reason is None:
            yield record
            return
        if self._table == SCORES:
            row = {k: record.get(k) for k in ("image_id", "image_uri", "category", "seed",
                                             "run_id", "model_id")}
            row.update(role="query", stage=WRITE_STAGE, reason=reason)
        else:
            row = dict(record, stage=WRITE_STAGE,
                       reason=f"{reason}; the row failed at {record.get('stage')}: "
                              f"{record.get('reason')}")
        yield pvalue.TaggedOutput(ERRORS, dict(row, dataset=None))


def _with_scorer(record: dict) -> dict:
    """Rows written before the scorer column existed were all InCTRL's."""
    if record.get("scorer") is None:
        record = dict(record, scorer=INCTRL)
    return record


def _summary_files(paths: dict, output: str) -> list[tuple]:
    return [(REPORT, SUMMARY, None, relative(output, path)) for path in paths.values()]


class WriteOutputs(beam.PTransform):
    """``{'scores', 'score_errors', 'queries', *ROW_ERRORS}`` → the scores and errors
    partitions of ``config.run_date`` plus the summary, staged and committed as one record
    change of the date (:mod:`pipeline.core.commit`). Returns ``{'scores': score records
    (carried ones included), 'errors': error records, 'committed': partition folders}``.

    ``scores`` and ``score_errors`` are records; the ``ROW_ERRORS`` inputs are RowErrors,
    turned into one error record per seed for queries (each query reconciles once per seed)
    and one with a null seed otherwise. Every dataset of ``queries``, and the rows without a
    dataset, get their partitions replaced in every table, even by none. ``carried_scores`` (a Parquet file of earlier score rows, the
    nightly job's) joins the new scores; with pixel metrics and kept maps, their maps (read
    back, masks from ``manifest_rows``, an optional input of every manifest row) count in
    the pixel metrics too. ``plan`` says where and from which record the run
    commits (default: the current record, no lock); with ``commit=False`` the files are only
    staged and listed, and the caller commits them (the nightly job, adding its reports).
    When more than ``config.max_failed_fraction`` of the run's (query, seed, scorer) rows
    failed (``pipeline.core.failures``), nothing is committed or listed and a refusal marker
    is left instead; the summary says how many rows failed (``failed_rows``).
    """

    def __init__(self, config: ScoreConfig, *, model_ids: dict[str, str],
                 manifest_schema: pa.Schema | None, carried_scores: str | None = None,
                 plan: CommitPlan | None = None, commit: bool = True) -> None:
        super().__init__()
        self._config = config
        self._model_ids = dict(model_ids)
        self._schema = manifest_schema
        self._carried = carried_scores
        self._plan = plan or CommitPlan(config.output, config.run_date, config.run_id)
        self._commit = commit

    def expand(self, outputs: dict) -> dict:
        cfg, model_ids, plan = self._config, self._model_ids, self._plan
        scores = outputs["scores"]
        new_scores = scores  # this run's rows only (not the carried ones)
        carried = carried_stats = None
        if self._carried:
            carried = (scores.pipeline
                       | "ReadCarriedScores" >> beam.io.ReadFromParquet(self._carried)
                       | "CarriedScorer" >> beam.Map(_with_scorer))
            if cfg.pixel_metrics and cfg.write_anomaly_maps and "manifest_rows" in outputs:
                # Carried rows count in the date's pixel metrics through the maps they kept.
                carried_stats = ({"carried": carried, "rows": outputs["manifest_rows"]}
                                 | "CarriedPixelStats" >> CarriedPixelStats())
        map_files = pixel = map_errors = None
        if cfg.anomaly_maps:
            mapped = scores | "AnomalyMaps" >> AnomalyMaps(
                cfg, plan, write=cfg.write_anomaly_maps, pixel=cfg.pixel_metrics,
                carried_stats=carried_stats)
            scores, map_files, pixel = mapped["scores"], mapped[FILES], mapped[PIXEL]
            map_errors = mapped[ERRORS]
        if carried is not None:
            scores = (scores, carried) | "WithCarriedScores" >> beam.Flatten()
        row_errors = (
            [outputs[key] for key in ROW_ERRORS if key in outputs]
            | "MergeRowErrors" >> beam.Flatten()
            | "ErrorRecords" >> beam.FlatMap(error_records, cfg.seeds, model_ids, cfg.run_id))
        errors = ((row_errors, outputs["score_errors"])
                  + ((map_errors,) if map_errors is not None else ())) | "AllErrors" >> beam.Flatten()
        checked = scores | "CheckScoreDatasets" >> beam.ParDo(
            _CheckDatasetFn(SCORES)).with_outputs(ERRORS, main="ok")
        checked_errors = errors | "CheckErrorDatasets" >> beam.ParDo(
            _CheckDatasetFn(ERRORS)).with_outputs(ERRORS, main="ok")
        scores = checked["ok"]
        errors = ((checked_errors["ok"], checked_errors[ERRORS], checked[ERRORS])
                  | "CheckedErrors" >> beam.Flatten())
        tally = {"scores": new_scores, ERRORS: errors} | "TallyFailures" >> TallyFailures()
        query_datasets = (outputs["queries"]
                          | "QueryDatasets" >> beam.Map(lambda row: row.dataset)
                          | "StorableDatasets" >> beam.Filter(
                              lambda d: unstorable_reason("dataset", d) is None))
        # Rows without a dataset (manifest rows without one, names that cannot be folders)
        # come from the manifest the run reads whole: every run answers for them too.
        unassigned = scores.pipeline | "Unassigned" >> beam.Create([None])
        datasets = ((query_datasets, unassigned) | "OwnedDatasets" >> beam.Flatten()
                    | "DistinctDatasets" >> beam.Distinct())
        score_schema = scores_schema(self._schema, cfg.write_patch_map, cfg.write_anomaly_maps)
        staged_scores = scores | "WriteScores" >> StageFiles(plan, SCORES, score_schema)
        staged_errors = errors | "WriteErrors" >> StageFiles(plan, ERRORS, ERROR_SCHEMA)
        staged_summary = (
            scores
            | "SummarizeMetrics" >> SummarizeMetrics(
                plan.staging_url(SUMMARY),
                extra={"run_id": cfg.run_id, "model_ids": model_ids, "run_date": cfg.run_date,
                       "k": cfg.k, "seeds": list(cfg.seeds), "scorers": list(cfg.scorers),
                       "reference_selection": cfg.reference_selection,
                       "reference_pool_limit": cfg.reference_pool_limit,
                       "false_alarm_rate": cfg.false_alarm_rate,
                       "precision": cfg.backbone.precision},
                pixel=pixel, tally=tally)
            | "SummaryFiles" >> beam.FlatMap(_summary_files, cfg.output))
        committed = (
            (staged_scores, staged_errors, staged_summary)
            + ((map_files,) if map_files is not None else ())
            | "StagedFiles" >> beam.Flatten()
            | "CommitRun" >> CommitStaged(plan, {SCORES: score_schema, ERRORS: ERROR_SCHEMA},
                                          datasets, commit=self._commit, tally=tally,
                                          max_failed_fraction=cfg.max_failed_fraction))
        return {"scores": scores, ERRORS: errors, "committed": committed}
