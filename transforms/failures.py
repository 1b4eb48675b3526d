"""TallyFailures: how many (query, seed, scorer) rows a run scored and how many failed, and
why (``pipeline.core.failures``), as one element the commit and the summary read."""
from __future__ import annotations

from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.core.failures import FailureTally, counts_as_failed
from pipeline.core.schemas import METRICS_NAMESPACE

#: Distinct reasons an accumulator keeps before it drops the rarest (counts stay exact).
_MAX_REASONS = 10_000


class _TallyFn(beam.CombineFn):
    """None per scored row, a reason per failed row → FailureTally. The accumulator is
    (scored, failed, Counter of reasons)."""

    def create_accumulator(self):
        return 0, 0, Counter()

    def add_input(self, acc, reason):
        scored, failed, reasons = acc
        if reason is None:
            return scored + 1, failed, reasons
        reasons[reason] += 1
        return scored, failed + 1, reasons

    def merge_accumulators(self, accumulators):
        scored, failed, reasons = 0, 0, Counter()
        for s, f, r in accumulators:
            scored, failed = scored + s, failed + f
            reasons.update(r)
        if len(reasons) > _MAX_REASONS:
            reasons = Counter(dict(reasons.most_common(_MAX_REASONS)))
        return scored, failed, reasons

    def extract_output(self, acc):
        scored, failed, reasons = acc
        tally = FailureTally.of(scored, reasons)
        return FailureTally(scored, failed, tally.reasons)


class _FailedReasonFn(beam.DoFn):
    """A failed row's reason (other error rows are dropped), counted."""

    def __init__(self) -> None:
        self._failed = Metrics.counter(METRICS_NAMESPACE, "rows_failed")

    def process(self, record: dict):
        if counts_as_failed(record):
            self._failed.inc()
            yield record.get("reason") or "(no reason given)"


class TallyFailures(beam.PTransform):
    """``{'scores': score records, 'errors': error records}`` → one FailureTally. Only the
    run's own rows: carried rows of an earlier run are not in ``scores``. Error rows of the
    stages that keep their scores, and rows without a seed (references, manifest rows
    without a role), are not failed rows."""

    def expand(self, outputs):
        scored = outputs["scores"] | "Scored" >> beam.Map(lambda _: None)
        errors = outputs["errors"] | "FailedRows" >> beam.ParDo(_FailedReasonFn())
        return ((scored, errors) | "Rows" >> beam.Flatten()
                | "Tally" >> beam.CombineGlobally(_TallyFn()))
