"""WriteOutputs: a run's scores, errors and summary, written and committed together."""
from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from pipeline.core.config import ScoreConfig
from pipeline.core.layout import summary_dir
from pipeline.core.schemas import ERROR_SCHEMA, ERRORS, SCORES, scores_schema
from transforms.errors import error_records
from transforms.summary import SummarizeMetrics
from transforms.write import WritePartitioned

#: Keys of WriteOutputs' input whose elements are RowErrors (not yet error records).
ROW_ERRORS = ("manifest_errors", "reference_errors", "image_errors")


class WriteOutputs(beam.PTransform):
    """``{'scores', 'score_errors', 'queries', *ROW_ERRORS}`` → committed scores and errors
    partitions of ``config.run_date`` plus the summary files. Returns ``{'scores': score
    records (carried ones included), 'errors': error records, 'committed': partition folders}``.

    ``scores`` and ``score_errors`` are records; the ``ROW_ERRORS`` inputs are RowErrors,
    turned into one error record per seed for queries (each query reconciles once per seed)
    and one with a null seed otherwise. Every dataset of ``queries`` gets its partition
    replaced, even by none. ``carried_scores`` (a Parquet file of earlier score rows, the
    nightly job's) joins the new scores.
    """

    def __init__(self, config: ScoreConfig, *, model_id: str, manifest_schema: pa.Schema | None,
                 carried_scores: str | None = None) -> None:
        super().__init__()
        self._config = config
        self._model_id = model_id
        self._schema = manifest_schema
        self._carried = carried_scores

    def expand(self, outputs: dict) -> dict:
        cfg, mid = self._config, self._model_id
        scores = outputs["scores"]
        if self._carried:
            carried = scores.pipeline | "ReadCarriedScores" >> beam.io.ReadFromParquet(
                self._carried)
            scores = (scores, carried) | "WithCarriedScores" >> beam.Flatten()
        row_errors = (
            [outputs[key] for key in ROW_ERRORS]
            | "MergeRowErrors" >> beam.Flatten()
            | "ErrorRecords" >> beam.FlatMap(error_records, cfg.seeds, cfg.run_id, mid))
        errors = (row_errors, outputs["score_errors"]) | "AllErrors" >> beam.Flatten()
        datasets = (outputs["queries"]
                    | "QueryDatasets" >> beam.Map(lambda row: row.dataset)
                    | "DistinctDatasets" >> beam.Distinct())
        committed_scores = scores | "WriteScores" >> WritePartitioned(
            cfg.output, SCORES, scores_schema(self._schema, cfg.write_patch_map),
            cfg.run_date, cfg.run_id, datasets=datasets)
        committed_errors = errors | "WriteErrors" >> WritePartitioned(
            cfg.output, ERRORS, ERROR_SCHEMA, cfg.run_date, cfg.run_id, datasets=datasets)
        scores | "SummarizeMetrics" >> SummarizeMetrics(
            summary_dir(cfg.output, cfg.run_date),
            extra={"run_id": cfg.run_id, "model_id": mid, "run_date": cfg.run_date,
                   "k": cfg.k, "seeds": list(cfg.seeds), "precision": cfg.backbone.precision})
        committed = (committed_scores, committed_errors) | "Committed" >> beam.Flatten()
        return {"scores": scores, ERRORS: errors, "committed": committed}
