"""Job wiring that needs no pipeline run: runner choice, flags, manifest location."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipeline.run import make_runner, manifest_pattern, parse_score_args


def test_direct_runner_is_the_offline_in_process_runner():
    for args in ([], ["--runner=DirectRunner"]):
        assert isinstance(make_runner(PipelineOptions(args)), FnApiRunner)
    assert make_runner(PipelineOptions(["--runner=DataflowRunner"])) is None


def test_beam_flags_pass_through_untouched():
    config, beam_args = parse_score_args([
        "--manifest", "m.parquet", "--output", "out/", "--seeds", "0,1", "--k", "3",
        "--runner=DirectRunner", "--direct_num_workers=2"])
    assert (config.output, config.seeds, config.k) == ("out", (0, 1), 3)
    assert beam_args == ["--runner=DirectRunner", "--direct_num_workers=2"]


def test_manifest_pattern_file_or_folder(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    assert manifest_pattern(str(path)) == str(path)
    assert manifest_pattern(str(tmp_path) + "/") == f"{tmp_path}/*.parquet"
