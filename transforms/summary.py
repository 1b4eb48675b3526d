"""SummarizeMetrics: per (dataset, scorer, category, k) metrics over seeds, and the
comparison table of the run's scorers (datasets × scorers), written as Parquet/JSON/Markdown."""
from __future__ import annotations

import logging
from typing import Iterable

import apache_beam as beam
import pandas as pd

from pipeline.core.decision_metrics import (DECISION_INPUTS, add_decision_metrics,
                                            short_calibration, summarize_decisions)
from pipeline.core.failures import FailureTally
from pipeline.core.metrics import (add_pixel_metrics, comparison_table, ordered_scorers,
                                   summarize_pixel_metrics, summarize_scores, summary_to_markdown,
                                   write_comparison, write_summary)

LOG = logging.getLogger(__name__)

_KEEP = ("dataset", "scorer", "category", "k", "seed", "label", "final_score", "fine_score",
         "image_residual_score", "text_prior_score", *DECISION_INPUTS)


def _compact(record: dict) -> tuple[str, tuple]:
    return record["dataset"], tuple(record.get(c) for c in _KEEP)


#: Datasets summarised together in one pandas pass. Every grouping of the summaries is keyed
#: by dataset, so a pass over several gives each the rows it would get alone; what a pass
#: saves is pandas' cost per call (about 0.3 s for its ~130 groupby and merge steps), which
#: per dataset made a run's time grow with its product lines, not its images (issue 22).
DATASETS_PER_PASS = 256


def _summarize_datasets(elements: list) -> pd.DataFrame:
    """[(dataset, compact rows), ...] → the summary rows of those datasets, in one pass."""
    frame = pd.DataFrame([row for _, rows in elements for row in rows], columns=list(_KEEP))
    frame["label"] = frame["label"].astype("Int64")
    return add_decision_metrics(summarize_scores(frame), summarize_decisions(frame))


class _WriteFn(beam.DoFn):
    def __init__(self, out_dir: str, extra: dict) -> None:
        self._out_dir = out_dir
        self._extra = extra

    def process(self, frames: list, pixel: list = (), tally: FailureTally | None = None
                ) -> Iterable:
        frames = [f for f in frames if len(f)]
        summary = (pd.concat(frames, ignore_index=True) if frames
                   else _summarize_datasets([]))
        if pixel:
            summary = add_pixel_metrics(summary, summarize_pixel_metrics(pd.DataFrame(pixel)))
        summary = summary.sort_values(["dataset", "level", "scorer", "category", "k"],
                                      kind="stable", key=_sort_key).reset_index(drop=True)
        _warn_short_calibration(summary)
        extra = dict(self._extra)
        if tally is not None:
            extra.update(failed_rows=tally.failed, expected_rows=tally.expected,
                         failed_reason=tally.most_common_reason)
        paths = write_summary(summary, self._out_dir, extra=extra)
        LOG.info("Summary written to %s", self._out_dir)
        LOG.debug("Summary:\n%s", summary_to_markdown(summary))
        comparison = write_comparison(comparison_table(summary), self._out_dir, extra=extra)
        paths.update({f"comparison_{kind}": path for kind, path in comparison.items()})
        yield paths


def _warn_short_calibration(summary: pd.DataFrame) -> None:
    """One warning naming every group whose calibration set is too small for a decision,
    and how many normal images it would need (the summary's ``decision_note`` says it per
    row)."""
    short = short_calibration(summary)
    if not short:
        return
    alpha = float(summary["false_alarm_rate"].dropna().iloc[0])
    need = short[0][3]
    groups = "; ".join(f"{d}/{c} has {n}, needs {need - n} more" for d, c, n, need in short)
    LOG.warning(
        "No decisions at false-alarm rate %g for %d group(s): a group needs at least %d "
        "normal calibration images (n + 1 >= 1/alpha; role=calibration rows, or with the "
        "random draw its reference candidates beyond k): %s", alpha, len(short), need, groups)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "level":
        return col.map({"category": 0, "dataset_mean": 1, "dataset_pooled": 2})
    if col.name == "scorer":
        order = {name: i for i, name in enumerate(ordered_scorers(col.dropna().unique()))}
        return col.map(order)
    return col


class SummarizeMetrics(beam.PTransform):
    """Score records → the summary and comparison files under ``out_dir``; the records
    grouped by dataset, up to :data:`DATASETS_PER_PASS` datasets summarised in one pass, then
    one write.

    Returns the written paths (``{"parquet", "json", "markdown", "comparison_parquet",
    "comparison_json", "comparison_markdown"}``). WriteOutputs points ``out_dir`` into the
    run's staging folder: the files become visible with the run's commit.
    """

    def __init__(self, out_dir: str, extra: dict, pixel=None, tally=None) -> None:
        """``pixel``: a PCollection of per-seed pixel-metric rows (AnomalyMaps), or None;
        ``tally``: the run's FailureTally (one element), or None: its ``failed_rows``,
        ``expected_rows`` and ``failed_reason`` join ``extra``."""
        super().__init__()
        self._write = _WriteFn(out_dir, extra)
        self._pixel = pixel
        self._tally = tally

    def expand(self, scores):
        frames = (
            scores
            | "Compact" >> beam.Map(_compact)
            | "ByDataset" >> beam.GroupByKey()
            | "Batch" >> beam.BatchElements(min_batch_size=DATASETS_PER_PASS,
                                            max_batch_size=DATASETS_PER_PASS)
            | "Summarize" >> beam.Map(_summarize_datasets)
            | "Collect" >> beam.combiners.ToList()
        )
        side = {}
        if self._pixel is not None:
            side["pixel"] = beam.pvalue.AsList(self._pixel)
        if self._tally is not None:
            side["tally"] = beam.pvalue.AsSingleton(self._tally)
        return frames | "Write" >> beam.ParDo(self._write, **side)
