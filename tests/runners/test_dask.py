"""The job on Beam's DaskRunner against a real ``distributed`` cluster (two worker processes).

One LocalCluster serves the whole module. ``pipeline.dask_runner`` completes Beam's Dask
translation; the small pipelines here pin the Beam semantics it must keep (tagged outputs,
finish_bundle outputs, side inputs, every sink computed, metrics), the last test runs the
scoring job itself and compares it with the DirectRunner's.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace

import apache_beam as beam
import pandas as pd
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.nightly.job import NightlyOptions, run_nightly
from pipeline.run import run_score
from pipeline.runner import make_runner
from tests.runners import RUN_DATE, assert_same_scores, direct_output, manifest_path, score_config

distributed = pytest.importorskip("distributed")
from pipeline.dask_runner import DaskRunner  # noqa: E402  (needs dask)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as local:
        with distributed.Client(local) as client:
            pids = set(client.run(os.getpid).values())
        yield local.scheduler_address, pids


def dask_args(address: str) -> list[str]:
    return ["--runner=DaskRunner", f"--dask_client_address={address}"]


class _SplitWithFlush(beam.DoFn):
    """Even numbers main, odd tagged, one marker per bundle from finish_bundle, a pid each."""

    def __init__(self) -> None:
        self._seen = Metrics.counter("test", "seen")

    def process(self, x):
        self._seen.inc()
        if x % 2:
            yield beam.pvalue.TaggedOutput("odd", (x, os.getpid()))
        else:
            yield x, os.getpid()

    def finish_bundle(self):
        yield WindowedValue(("flushed", os.getpid()), 0, [GlobalWindow()])


def test_make_runner_picks_the_dask_translation():
    assert isinstance(make_runner(PipelineOptions(["--runner=DaskRunner"])), DaskRunner)


def test_beam_semantics_on_the_cluster(cluster):
    address, worker_pids = cluster
    p = beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(dask_args(address)))
    out = (p | "Numbers" >> beam.Create(range(8))
           | beam.ParDo(_SplitWithFlush()).with_outputs("odd", main="even"))
    even = out.even | "EvenValues" >> beam.Map(lambda kv: kv[0])
    assert_that(even | "NoFlushMarkers" >> beam.Filter(lambda v: v != "flushed"),
                equal_to([0, 2, 4, 6]), label="MainOutput")
    assert_that(out.odd | "OddValues" >> beam.Map(lambda kv: kv[0]), equal_to([1, 3, 5, 7]),
                label="TaggedOutput")
    assert_that(even | "Flushes" >> beam.Filter(lambda v: v == "flushed")
                | beam.combiners.Count.Globally() | "AtLeastOne" >> beam.Map(lambda n: n >= 1),
                equal_to([True]), label="FinishBundleOutput")
    pids = (out.even, out.odd) | beam.Flatten() | "Pids" >> beam.Map(lambda kv: kv[1])
    assert_that(pids | "OnWorkers" >> beam.Map(lambda pid, ok: pid in ok, worker_pids)
                | "Once" >> beam.Distinct(), equal_to([True]), label="RanOnWorkerProcesses")

    sides = p | "Sides" >> beam.Create([("a", 10), ("b", 20)])
    grouped = (p | "Pairs" >> beam.Create([("a", 1), ("b", 2), ("a", 3)])
               | beam.GroupByKey()
               | beam.Map(lambda kv, d: (kv[0], sorted(kv[1]), d[kv[0]]),
                          beam.pvalue.AsDict(sides)))
    assert_that(grouped, equal_to([("a", [1, 3], 10), ("b", [2], 20)]), label="GroupAndSide")
    assert_that(p | "Nothing" >> beam.Create([]) | beam.combiners.ToList(), equal_to([[]]),
                label="EmptyInput")

    result = p.run()
    assert result.wait_until_finish() == "DONE"
    seen = result.metrics().query(MetricsFilter().with_name("seen"))["counters"]
    assert sum(c.committed for c in seen) == 8


def test_a_failing_bundle_fails_the_run(cluster):
    address, _ = cluster

    def boom(x):
        raise ValueError(f"bad element {x}")

    p = beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(dask_args(address)))
    _ = p | beam.Create([1, 2]) | beam.Map(boom)
    with pytest.raises(ValueError, match="bad element"):
        p.run().wait_until_finish()


def test_scores_equal_the_direct_runner(cluster, tmp_path):
    address, _ = cluster
    expected = direct_output()
    out = str(tmp_path / "dask")
    result = run_score(score_config(manifest_path(), out), dask_args(address))
    assert result.state == "DONE"
    assert_same_scores(expected, out)
    # Every sink ran, not only the last one: errors and summary were written as well.
    for path in ("summary/run_date=2024-01-02/summary.json",
                 "errors/dataset=industrial_objects/run_date=2024-01-02/_SUCCESS"):
        assert os.path.exists(os.path.join(out, path)), path
    scored = result.metrics().query(MetricsFilter().with_name("queries_scored"))["counters"]
    assert sum(c.committed for c in scored) == 32


def test_incremental_night_on_dask_matches_the_direct_runner(cluster, tmp_path):
    """The nightly job unchanged on Dask: carried rows read back, one late query scored."""
    address, _ = cluster
    frame = pd.read_parquet(manifest_path())
    frame["capture_date"] = [RUN_DATE if role == "query" else None for role in frame["role"]]
    dated = str(tmp_path / "dated.parquet")
    frame.to_parquet(dated, index=False)

    def night(out: str, args: list[str]):
        config = replace(score_config(dated, out), run_date=RUN_DATE, run_id=os.path.basename(out),
                         feature_cache=f"{out}/_feature_cache")
        return run_nightly(config, args, NightlyOptions())

    direct = str(tmp_path / "direct")
    assert night(direct, []).scored_queries == 16
    # Dask starts from the same partitions, less one query scored late.
    dask_out = str(tmp_path / "dask")
    shutil.copytree(direct, dask_out)
    late = frame.loc[frame["role"] == "query", "image_id"].iloc[0]
    (part,) = [os.path.join(folder, name) for folder, _, names in os.walk(f"{dask_out}/scores")
               for name in names if name.endswith(".parquet")
               and late in pq.read_table(os.path.join(folder, name))["image_id"].to_pylist()]
    table = pq.read_table(part)
    pq.write_table(table.filter(pd.Series(table["image_id"].to_pylist()).ne(late).to_list()), part)

    report = night(dask_out, dask_args(address))
    assert (report.scored_queries, report.already_scored, report.carried_rows) == (1, 15, 30)
    assert report.reference_features_extracted == 0 and report.reference_cache_hits == 10
    assert_same_scores(direct, dask_out)
