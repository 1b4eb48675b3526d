"""A manifest that cannot be used stops the job before any pipeline starts, with one message."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.run
from pipeline import cli
from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import ManifestSchemaError
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, tiny_spec
from pipeline.run import run_score



def _manifest(tmp_path, **columns) -> str:
    base = {"image_uri": pa.array(["/d/a.png"]), "dataset": pa.array(["ds"]),
            "role": pa.array(["query"]), "label": pa.array([0], pa.int64())}
    base.update(columns)
    table = pa.table({k: v for k, v in base.items() if v is not None})
    path = str(tmp_path / "manifest.parquet")
    pq.write_table(table, path)
    return path


@pytest.fixture
def no_pipeline(monkeypatch):
    """Fails the test if a pipeline gets as far as being built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was built although the manifest is unusable")
    monkeypatch.setattr(pipeline.run, "build_pipeline", refuse)
    monkeypatch.setattr(pipeline.run, "run_pipeline", refuse)


@pytest.mark.parametrize("columns,named", [
    ({"role": None}, "'role'"),
    ({"label": pa.array(["0"])}, "'label'"),
    ({"dataset": pa.array([3], pa.int64())}, "'dataset'"),
])
def test_schema_error_names_the_column(tmp_path, no_pipeline, columns, named):
    path = _manifest(tmp_path, **columns)
    output = tmp_path / "out"
    config = ScoreConfig(manifest=path, output=str(output), backbone=tiny_spec())
    with pytest.raises(ManifestSchemaError, match=named) as caught:
        run_score(config, beam_args=[])
    assert path in str(caught.value)
    assert not output.exists()


def test_missing_manifest(tmp_path, no_pipeline):
    config = ScoreConfig(manifest=str(tmp_path / "nope.parquet"), output=str(tmp_path / "out"),
                         backbone=tiny_spec())
    with pytest.raises(ManifestSchemaError, match="not found"):
        run_score(config, beam_args=[])


def test_command_line_exits_1_with_the_message(tmp_path, caplog, capsys):
    path = _manifest(tmp_path, role=None)
    output = tmp_path / "out"
    code = cli.main(["score", "--manifest", path, "--output", str(output),
                     "--backbone", TINY_BACKBONE, "--pretrained", TINY_PRETRAINED])
    assert code == 1  # returned, not raised: no traceback
    problems = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(problems) == 1
    assert "missing required column(s) 'role'" in problems[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not output.exists()
