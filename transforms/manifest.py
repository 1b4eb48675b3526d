"""ReadManifest: Parquet manifest rows → normalised, de-duplicated rows plus error rows."""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.core.manifest import ManifestRow, RowError, manifest_files, normalize_row
from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE

STAGE_DEDUPLICATE = "deduplicate"


class _NormalizeFn(beam.DoFn):
    def __init__(self) -> None:
        self._read = Metrics.counter(METRICS_NAMESPACE, "manifest_rows_read")
        self._bad = Metrics.counter(METRICS_NAMESPACE, "manifest_rows_rejected")

    def process(self, raw: dict) -> Iterable:
        self._read.inc()
        row = normalize_row(raw)
        if isinstance(row, RowError):
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, row)
        else:
            yield row


class _KeepFirstFn(beam.DoFn):
    """Of rows sharing (dataset, role, image_id), keep the one with the smallest URI; the rest
    are errors. The same image may serve several datasets (a golden reference shared by
    product lines): those rows are not duplicates."""

    def __init__(self) -> None:
        self._dupes = Metrics.counter(METRICS_NAMESPACE, "manifest_rows_duplicate")

    def process(self, element: tuple[tuple[str, str], Iterable[ManifestRow]]) -> Iterable:
        (_, _, image_id), rows = element
        ordered = sorted(rows, key=lambda r: (r.image_uri, r.category))
        yield ordered[0]
        for dup in ordered[1:]:
            self._dupes.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, RowError(
                image_uri=dup.image_uri, dataset=dup.dataset, category=dup.category,
                image_id=dup.image_id, role=dup.role, stage=STAGE_DEDUPLICATE,
                reason=(f"duplicate image_id {image_id!r} in dataset {dup.dataset!r} ({dup.role}): "
                        f"already used by {ordered[0].image_uri}"),
            ))


class ReadManifest(beam.PTransform):
    """Reads a Parquet manifest into ``{'rows': ManifestRow, 'errors': RowError}``.

    ``path`` is a Parquet file or a folder of them: exactly the files that
    ``validate_manifest_schema`` checks (``manifest_files``) are read.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self._files = manifest_files(path)

    def expand(self, pbegin):
        normalized = (
            pbegin
            | "ManifestFiles" >> beam.Create(self._files)
            | "ReadParquet" >> beam.io.ReadAllFromParquet()
            | "Normalize" >> beam.ParDo(_NormalizeFn()).with_outputs(ERRORS, main="rows")
        )
        unique = (
            normalized.rows
            | "KeyByDatasetRoleAndId" >> beam.Map(lambda r: ((r.dataset, r.role, r.image_id), r))
            | "GroupById" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirstFn()).with_outputs(ERRORS, main="rows")
        )
        errors = (normalized[ERRORS], unique[ERRORS]) | "MergeErrors" >> beam.Flatten()
        return {"rows": unique.rows, ERRORS: errors}


class _SelectQueriesFn(beam.DoFn):
    def __init__(self, is_query) -> None:
        self._is_query = is_query
        self._selected = Metrics.counter(METRICS_NAMESPACE, "queries_selected")

    def process(self, row: ManifestRow) -> Iterable[ManifestRow]:
        if self._is_query(row):
            self._selected.inc()
            yield row


class SelectQueries(beam.PTransform):
    """ManifestRow → the query rows ``is_query(row)`` keeps, counted as ``queries_selected``."""

    def __init__(self, is_query) -> None:
        super().__init__()
        self._fn = _SelectQueriesFn(is_query)

    def expand(self, rows):
        return rows | "Select" >> beam.ParDo(self._fn)
