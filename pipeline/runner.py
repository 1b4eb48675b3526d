"""Running a job's pipeline: options from Beam's flags, the runner, run and wait, counters.

Every job (score, nightly, train's extraction) builds its graph into a ``beam.Pipeline``
made here and reads its Beam metrics back through :func:`counter`.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from pipeline.core.schemas import METRICS_NAMESPACE

LOG = logging.getLogger(__name__)

#: Namespace of every counter and distribution the project's transforms report.
NAMESPACE = METRICS_NAMESPACE

DIRECT_RUNNERS = {"DirectRunner", "SwitchingDirectRunner", None}
DASK_RUNNERS = {"DaskRunner", "apache_beam.runners.dask.dask_runner.DaskRunner"}


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    return PipelineOptions(list(beam_args), save_main_session=False)


def runner_name(beam_args: Sequence[str]) -> str:
    """The runner the flags name (DirectRunner when none)."""
    return pipeline_options(beam_args).view_as(StandardOptions).runner or "DirectRunner"


def make_runner(options: PipelineOptions):
    """The runner named by the options; the DirectRunner runs in-process with no download.

    Beam's DirectRunner first tries to fetch a Prism binary from the network; for batch jobs
    it then uses the in-process FnApiRunner, which we pick directly so offline runs stay offline.
    ``DaskRunner`` is Beam's, with the translation fixes of ``pipeline.dask_runner``.
    """
    name = options.view_as(StandardOptions).runner
    if name in DIRECT_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    if name in DASK_RUNNERS:
        from pipeline.dask_runner import DaskRunner  # needs the [dask] extra

        return DaskRunner()
    return None  # Beam resolves it from the options


def run_pipeline(build: Callable[[beam.Pipeline], object],
                 beam_args: Sequence[str]) -> PipelineResult:
    """Build a pipeline with ``build(p)`` on the runner the flags name, run it, wait for it."""
    options = pipeline_options(beam_args)
    p = beam.Pipeline(runner=make_runner(options), options=options)
    build(p)
    result = p.run()
    result.wait_until_finish()
    return result


def _query(result: PipelineResult, name: str, kind: str, step: str | None) -> list | None:
    """The project's metrics ``name`` of ``kind`` ("counters", "distributions") over every
    step (or the steps whose name contains ``step``); None when the runner reports none."""
    try:
        found = result.metrics().query(
            MetricsFilter().with_namespace(NAMESPACE).with_name(name))[kind]
    except Exception as exc:  # noqa: BLE001 - some runners report no metrics at all
        LOG.info("No metrics from this runner (%s)", exc)
        return None
    return [m for m in found if step is None or step in m.key.step]


def counter(result: PipelineResult, name: str, step: str | None = None) -> int | None:
    """The committed total of the project's counter ``name`` over every step (or the steps
    whose name contains ``step``); None when the runner reports no metrics."""
    found = _query(result, name, "counters", step)
    return None if found is None else int(sum((c.committed or 0) for c in found))


def distribution_max(result: PipelineResult, name: str, step: str | None = None) -> int | None:
    """The largest value the project's distribution ``name`` saw over every step (or the
    steps whose name contains ``step``); None when the runner reports none."""
    found = _query(result, name, "distributions", step)
    if found is None:
        return None
    values = [d.committed or d.attempted for d in found]
    values = [v.max for v in values if v is not None and v.count]
    return int(max(values)) if values else None
