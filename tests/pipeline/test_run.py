"""Job wiring that needs no pipeline run: runner choice, flags, manifest location."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipeline.cli.score import parse_score_command
from pipeline.core.manifest import manifest_files
from pipeline.runner import make_runner


def parse_score_args(argv):
    """(configuration, Beam's flags) of score's command line."""
    return parse_score_command(argv)[:2]


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


def test_manifest_files_are_what_validation_checks(tmp_path):
    """A folder manifest: every non-hidden data file, nested ones too, none of the hidden."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    assert manifest_files(str(path)) == [str(path)]
    (tmp_path / "sub").mkdir()
    pq.write_table(pa.table({"a": [2]}), tmp_path / "sub" / "part-0")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_text("")
    assert manifest_files(str(tmp_path)) == [str(path), str(tmp_path / "sub" / "part-0")]
