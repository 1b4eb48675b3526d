"""``python -m pipeline make-manifest``: flags, output and errors."""
from __future__ import annotations

import logging
import os

import pandas as pd
import pytest

from pipeline.cli import make_manifest as make_manifest_cli


def test_cli_writes_parquet_and_logs_summary(mvtec_tree, tmp_path, caplog):
    out = str(tmp_path / "m.parquet")
    with caplog.at_level(logging.INFO, logger="pipeline.cli.make_manifest"):
        code = make_manifest_cli.main(
            ["--root", mvtec_tree, "--dataset", "mv", "--output", out]
        )

    assert code == 0
    df = pd.read_parquet(out)
    assert len(df) == 8
    assert set(df["dataset"]) == {"mv"}
    assert "mv: 5 query, 3 reference" in caplog.text


def test_cli_errors(mvtec_tree, tmp_path):
    out = str(tmp_path / "m.parquet")
    with pytest.raises(SystemExit) as info:
        make_manifest_cli.main(
            ["--root", mvtec_tree, "--root", mvtec_tree, "--dataset", "a", "--output", out]
        )
    assert info.value.code == 2
    assert make_manifest_cli.main(["--root", str(tmp_path / "nowhere"), "--output", out]) == 1
    assert not os.path.exists(out)
