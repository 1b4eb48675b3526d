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


# --------------------------------------------------------------------------------------------
# layouts as they ship, plain folders, the closing line
# --------------------------------------------------------------------------------------------


def _closing_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "pipeline.cli.make_manifest" and r.getMessage().startswith("wrote ")]
    assert len(lines) == 1
    return lines[0]


def test_cli_plain_folder_lines(tmp_path, caplog):
    from tests.dataset_trees import image

    for name in ("q1/a.png", "q1/sub/b.png", "r1/c.png", "cal/d.png", "q2/e.png", "r2/f.png"):
        image(tmp_path / name)
    out = str(tmp_path / "m.parquet")
    with caplog.at_level(logging.INFO):
        code = make_manifest_cli.main([
            "--queries", str(tmp_path / "q1"), "--references", str(tmp_path / "r1"),
            "--dataset", "line1", "--category", "bracket", "--calibration", str(tmp_path / "cal"),
            "--dataset", "line2", "--references", str(tmp_path / "r2"),
            "--queries", str(tmp_path / "q2"), "--output", out])

    assert code == 0
    df = pd.read_parquet(out)
    got = sorted(zip(df["dataset"], df["category"], df["role"], df["label"].isna(),
                     [os.path.relpath(u, tmp_path) for u in df["image_uri"]]))
    assert got == [("line1", "bracket", "calibration", False, "cal/d.png"),
                   ("line1", "bracket", "query", True, "q1/a.png"),
                   ("line1", "bracket", "query", True, "q1/sub/b.png"),
                   ("line1", "bracket", "reference", False, "r1/c.png"),
                   ("line2", "line2", "query", True, "q2/e.png"),
                   ("line2", "line2", "reference", False, "r2/f.png")]
    assert _closing_line(caplog) == (
        f"wrote 6 rows to {out} (line1: 1 calibration, 2 query, 1 reference; line2: 1 query, "
        "1 reference); no problems found")


def test_cli_one_folder_per_line_and_problem_counts(tmp_path, caplog):
    from tests.dataset_trees import image

    for name in ("tonight/a/1.png", "tonight/b/1.png", "golden/a/1.png", "golden/b/1.png"):
        image(tmp_path / name)
    os.makedirs(tmp_path / "tonight" / "c")
    out = str(tmp_path / "m.parquet")
    with caplog.at_level(logging.INFO):
        code = make_manifest_cli.main([
            "--queries", str(tmp_path / "tonight"), "--references", str(tmp_path / "golden"),
            "--folder-per-line", "--output", out])

    assert code == 0
    assert sorted(pd.read_parquet(out)["dataset"].unique()) == ["a", "b"]
    assert _closing_line(caplog).endswith("; 1 empty or missing folder")


def test_cli_reads_published_layouts_and_names_them(tmp_path, caplog):
    from tests.dataset_trees import make_loco, make_realiad

    loco, realiad = make_loco(tmp_path), make_realiad(tmp_path)
    out = str(tmp_path / "out" / "bench.parquet")
    with caplog.at_level(logging.INFO):
        code = make_manifest_cli.main(["--root", loco, "--root", realiad,
                                       "--dataset", "loco", "--dataset", "riad",
                                       "--output", out])

    assert code == 0
    assert f"{loco}: read as mvtec_loco" in caplog.text
    assert f"{realiad}: read as realiad" in caplog.text
    df = pd.read_parquet(out)
    assert {"sample_id", "view"} <= set(df.columns)
    # The union of LOCO's two mask files lies beside the manifest, named after it.
    unions = [u for u in df["mask_uri"].dropna() if "bench_masks" in u]
    assert unions == [str(tmp_path / "out" / "bench_masks" / "loco" / "breakfast_box"
                          / "logical_anomalies" / "000.png")]
    assert os.path.isfile(unions[0])
    assert "1 calibration" in _closing_line(caplog)


def test_cli_explicit_layout_per_root(tmp_path):
    from tests.dataset_trees import make_ad2

    out = str(tmp_path / "m.parquet")
    assert make_manifest_cli.main(["--root", make_ad2(tmp_path), "--layout", "mvtec_ad2",
                                   "--output", out]) == 0
    assert make_manifest_cli.main(["--root", make_ad2(tmp_path), "--layout", "visa",
                                   "--output", str(tmp_path / "n.parquet")]) == 1
    assert not os.path.exists(tmp_path / "n.parquet")


@pytest.mark.parametrize("argv,message", [
    (["--root", "R", "--queries", "Q", "--dataset", "d"], "not both"),
    ([], "nothing to read"),
    (["--queries", "Q"], "--queries Q: plain folders need a dataset name"),
    (["--queries", "Q", "--dataset", "d", "--queries", "P"], "--queries P: plain folders need"),
    (["--queries", "Q", "--folder-per-line", "--dataset", "d"], "cannot be given"),
    (["--root", "R", "--category", "c"], "--category and --folder-per-line go with plain"),
    (["--root", "R", "--root", "S", "--layout", "visa", "--layout", "mvtec",
      "--layout", "mvtec"], "3 --layout"),
    (["--queries", "Q", "--dataset", "d", "--layout", "visa"], "go with --root"),
    (["--root", "R", "--layout", "mvtec3"], "invalid choice"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        make_manifest_cli.main(argv + ["--output", str(tmp_path / "m.parquet")])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_folder_that_does_not_exist_fails_with_one_line(tmp_path, caplog):
    code = make_manifest_cli.main(["--queries", str(tmp_path / "nope"), "--dataset", "d",
                                   "--output", str(tmp_path / "m.parquet")])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "does not exist" in errors[0]
