"""The command line: commands found statically, flags checked once, unknown flags refused."""
from __future__ import annotations

import sys

import pytest

from pipeline import cli
from pipeline.cli.demo import build_parser as demo_parser
from pipeline.cli.flags import parse_with_beam
from pipeline.cli.score import build_parser as score_parser, parse_score_command
from pipeline.cli.train import parse_train_args


def parse_score_args(argv):
    """(configuration, Beam's flags) of score's command line."""
    return parse_score_command(argv)[:2]


BASE = ["--manifest", "m.parquet", "--output", "out"]


def test_every_command_is_registered_and_importable():
    assert set(cli.COMMANDS) == {"score", "nightly", "train", "demo", "report", "vacuum",
                                 "make-manifest", "import-checkpoint"}
    for module, _ in cli.COMMANDS.values():
        assert callable(__import__(module, fromlist=["main"]).main)


def test_an_import_error_inside_a_command_is_not_an_unknown_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tests_cli_broken", None)  # importing it raises
    monkeypatch.setitem(cli.COMMANDS, "score", ("tests_cli_broken", "broken"))
    with pytest.raises(ImportError):
        cli.main(["score", *BASE])
    assert "unknown command" not in capsys.readouterr().err


def test_unknown_command_and_help(capsys):
    assert cli.main(["scroe"]) == 2
    assert "unknown command 'scroe'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "nightly" in capsys.readouterr().out


def test_a_misspelt_flag_stops_the_run_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_score_args([*BASE, "--sed", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --sed 3" in err and "did you mean --seeds?" in err


def test_beam_flags_still_pass_through():
    _, beam_args = parse_score_args([*BASE, "--runner=DirectRunner", "--direct_num_workers=2",
                                     "--experiments=use_runner_v2", "--job_name", "x"])
    assert beam_args == ["--runner=DirectRunner", "--direct_num_workers=2",
                         "--experiments=use_runner_v2", "--job_name", "x"]


@pytest.mark.parametrize("bad", [["--k", "-1"], ["--seeds", "a"], ["--seeds", "1,1"],
                                 ["--batch-size", "-2"], ["--decode-threads", "-1"],
                                 ["--max-failed-fraction", "1.5"],
                                 ["--max-failed-fraction", "-0.1"]])
def test_bad_values_are_usage_errors_in_every_command(bad, capsys):
    for parser, base in ((score_parser(), BASE), (demo_parser(), [])):
        with pytest.raises(SystemExit) as exit_:
            parse_with_beam(parser, [*base, *bad])
        assert exit_.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_max_failed_fraction_flag():
    assert parse_score_args(BASE)[0].max_failed_fraction == 0.05
    assert parse_score_args([*BASE, "--max-failed-fraction", "0"])[0].max_failed_fraction == 0.0


def test_scorers_and_zero_shot_flags(capsys):
    config, _ = parse_score_args([*BASE, "--scorer", "patchcore, inctrl,patchcore",
                                  "--cnn-backbone", "mobilenet_v2", "--cnn-weights", "random:3",
                                  "--coreset-ratio", "0.5"])
    assert config.scorers == ("patchcore", "inctrl")
    cnn = config.suite.extractor_spec("cnn")
    assert (cnn.backbone, cnn.weights, cnn.strides) == ("mobilenet_v2", "random:3", (8, 16))
    assert config.suite.setting("coreset_ratio") == 0.5
    assert parse_score_args([*BASE, "--k", "0"])[0].k == 0  # inctrl zero-shot: text prior
    assert parse_score_args([*BASE, "--k", "0", "--scorer", "winclip"])[0].k == 0
    for parser, base in ((score_parser(), BASE), (demo_parser(), [])):
        with pytest.raises(SystemExit) as exit_:
            parse_with_beam(parser, [*base, "--k", "0", "--scorer", "inctrl,spade,padim"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "spade, padim cannot score with k=0" in err and "inctrl, winclip" in err
        with pytest.raises(SystemExit):
            parse_with_beam(parser, [*base, "--scorer", "inctrl,regadd"])
        assert "unknown scorer 'regadd'" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # a trained scorer without its checkpoint
            parse_with_beam(parser, [*base, "--scorer", "inctrl,regad"])
        assert "regad needs --regad-checkpoint FILE" in capsys.readouterr().err


def test_cnn_runtime_flags_reach_the_cnn(tmp_path):
    default = parse_score_args([*BASE, "--scorer", "patchcore"])[0]
    assert default.suite.extractor_spec("cnn").runtime == "torch"
    with pytest.raises(SystemExit) as exit_:
        parse_score_args([*BASE, "--scorer", "patchcore", "--cnn-runtime", "onnx"])
    assert exit_.value.code == 2
    pytest.importorskip("openvino", reason="the optional openvino package is not installed")
    config, _ = parse_score_args([*BASE, "--scorer", "patchcore", "--cnn-runtime", "openvino",
                                  "--compiled-cache", str(tmp_path)])
    cnn = config.suite.extractor_spec("cnn")
    assert (cnn.runtime, cnn.compiled_cache) == ("openvino", str(tmp_path))


def test_the_demo_takes_the_score_flags():
    args, _ = parse_with_beam(demo_parser(), ["--k", "2", "--seeds", "4,5", "--batch-size", "3"])
    assert (args.k, args.seeds, args.batch_size) == (2, (4, 5), 3)
    default, _ = parse_with_beam(demo_parser(), [])
    assert default.seeds == (0, 1, 2)


def test_semantic_classes_parse_the_same_for_score_and_train():
    config, _ = parse_score_args([*BASE, "--semantic-classes", "bird, cat,,"])
    train, _ = parse_train_args([*BASE, "--semantic-classes", "bird, cat,,"])
    assert config.semantic_classes == train.semantic_classes == frozenset({"bird", "cat"})


def test_training_and_nightly_share_the_feature_cache_folder_name():
    from pipeline.cli.nightly import parse_nightly_args

    train, _ = parse_train_args(BASE)
    night, _, _ = parse_nightly_args([*BASE, "--date", "2024-01-02"])
    assert train.cache_root == night.feature_cache == "out/_feature_cache"


def test_an_unwritable_output_fails_in_one_line_before_the_pipeline(monkeypatch, caplog):
    import pipeline.run

    def refuse(*args, **kwargs):
        raise AssertionError("the job started although its output cannot be written")

    monkeypatch.setattr(pipeline.run, "run_score", refuse)
    assert cli.main(["score", "--manifest", "m.parquet", "--output", "/proc/nope"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "/proc/nope" in errors[0] and "not writable" in errors[0]


def test_a_date_held_by_another_run_exits_4_in_one_line(monkeypatch, tmp_path, caplog):
    import pipeline.run
    from pipeline.core.locks import LockHeld

    waits = []

    def held(config, beam_args, lock_wait_s=0.0, **kwargs):
        waits.append(lock_wait_s)
        raise LockHeld(f"{config.output} date {config.run_date} is held by run other-run")

    monkeypatch.setattr(pipeline.run, "run_score", held)
    out = str(tmp_path / "out")
    assert cli.main(["score", "--manifest", "m.parquet", "--output", out, "--lock-wait", "2.5",
                     "--run-date", "2024-01-02"]) == cli.EXIT_LOCKED == 4
    assert waits == [2.5]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "held by run other-run" in errors[0]
