"""The job through Beam's PortableRunner with the embedded job service: the submission path
that Flink and Spark use (pipeline proto → job service → SDK harness), in-process."""
from __future__ import annotations

from apache_beam.metrics import MetricsFilter

from pipeline.run import run_score
from tests.runners import assert_same_scores, direct_output, manifest_path, score_config

PORTABLE_ARGS = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]


def test_scores_equal_the_direct_runner(tmp_path):
    expected = direct_output()
    out = str(tmp_path / "portable")
    result = run_score(score_config(manifest_path(), out), PORTABLE_ARGS)
    assert result.state == "DONE"
    assert_same_scores(expected, out)
    scored = result.metrics().query(MetricsFilter().with_name("queries_scored"))["counters"]
    assert sum(c.committed for c in scored) == 32
