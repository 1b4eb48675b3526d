"""SummarizeMetrics: per (dataset, category, k) metrics over seeds, written as Parquet/JSON/Markdown."""
from __future__ import annotations

import logging
from typing import Iterable

import apache_beam as beam
import pandas as pd

from pipeline.core.metrics import summarize_scores, summary_to_markdown, write_summary

LOG = logging.getLogger(__name__)

_KEEP = ("dataset", "category", "k", "seed", "label", "final_score", "fine_score",
         "image_residual_score", "text_prior_score")


def _compact(record: dict) -> tuple[str, tuple]:
    return record["dataset"], tuple(record.get(c) for c in _KEEP)


def _summarize_dataset(element) -> pd.DataFrame:
    _, rows = element
    frame = pd.DataFrame(list(rows), columns=list(_KEEP))
    frame["label"] = frame["label"].astype("Int64")
    return summarize_scores(frame)


class _WriteFn(beam.DoFn):
    def __init__(self, out_dir: str, extra: dict) -> None:
        self._out_dir = out_dir
        self._extra = extra

    def process(self, frames: list) -> Iterable:
        frames = [f for f in frames if len(f)]
        summary = pd.concat(frames, ignore_index=True) if frames else summarize_scores(
            pd.DataFrame(columns=list(_KEEP)))
        summary = summary.sort_values(["dataset", "level", "category", "k"], kind="stable",
                                      key=_level_order).reset_index(drop=True)
        paths = write_summary(summary, self._out_dir, extra=self._extra)
        LOG.info("Summary written to %s", self._out_dir)
        LOG.debug("Summary:\n%s", summary_to_markdown(summary))
        yield paths


def _level_order(col: pd.Series) -> pd.Series:
    if col.name == "level":
        return col.map({"category": 0, "dataset_mean": 1, "dataset_pooled": 2})
    return col


class SummarizeMetrics(beam.PTransform):
    """Score records → summary files under ``out_dir``; one dataset per group, then one write.

    Returns the written paths (``{"parquet", "json", "markdown"}``). WriteOutputs points
    ``out_dir`` into the run's staging folder: the files become visible with the run's commit.
    """

    def __init__(self, out_dir: str, extra: dict) -> None:
        super().__init__()
        self._write = _WriteFn(out_dir, extra)

    def expand(self, scores):
        return (
            scores
            | "Compact" >> beam.Map(_compact)
            | "ByDataset" >> beam.GroupByKey()
            | "Summarize" >> beam.Map(_summarize_dataset)
            | "Collect" >> beam.combiners.ToList()
            | "Write" >> beam.ParDo(self._write)
        )
