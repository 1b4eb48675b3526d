"""The shipped schedules (crontab line, systemd timer, Airflow DAG) start the nightly job with
flags it accepts, checked offline without cron, systemd or Airflow."""
from __future__ import annotations

import ast
import configparser
import os
import re
import subprocess
import sys

import pytest

from pipeline.cli.nightly import parse_nightly_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
WRAPPER = os.path.join(DEPLOY, "run_nightly.sh")


def wrapper_command(*args: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", WRAPPER, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", **env})
    return out.stdout.splitlines()


def nightly_args(command: list[str]) -> list[str]:
    assert command[1:4] == ["-m", "pipeline", "nightly"], command
    return command[4:]


def test_wrapper_passes_settings_and_arguments():
    command = wrapper_command("--date", "2024-05-01", "--force",
                              INCTRL_MANIFEST="/data/m.parquet", INCTRL_OUTPUT="/data/out",
                              INCTRL_VENV="/opt/venv", INCTRL_ARGS="--k 4 --seeds 0,1,2")
    assert command[0] == "/opt/venv/bin/python"
    config, options, beam_args = parse_nightly_args(nightly_args(command))
    assert (config.manifest, config.output, config.run_date) == ("/data/m.parquet", "/data/out",
                                                                 "2024-05-01")
    assert config.k == 4 and config.seeds == (0, 1, 2) and options.force and beam_args == []


def test_wrapper_needs_manifest_and_output():
    with pytest.raises(subprocess.CalledProcessError):
        wrapper_command(INCTRL_MANIFEST="", INCTRL_OUTPUT="/data/out")


def test_crontab_line_runs_the_wrapper_nightly():
    lines = [l for l in open(os.path.join(DEPLOY, "crontab.example")).read().splitlines()
             if l.strip() and not l.startswith("#")]
    env = dict(l.split("=", 1) for l in lines if re.match(r"^\w+=", l))
    (job,) = [l for l in lines if not re.match(r"^\w+=", l)]
    minute, hour, dom, month, dow, command = job.split(maxsplit=5)
    assert (dom, month, dow) == ("*", "*", "*") and minute.isdigit() and hour.isdigit()
    assert command.split()[0].endswith("deploy/run_nightly.sh")
    assert os.access(WRAPPER, os.X_OK)
    config, _, _ = parse_nightly_args(nightly_args(wrapper_command(**env)))
    assert config.manifest == env["INCTRL_MANIFEST"]


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(os.path.join(DEPLOY, "systemd", name))
    return parser


def test_systemd_timer_starts_the_oneshot_service():
    service, timer = unit("inctrl-nightly.service"), unit("inctrl-nightly.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].endswith("/deploy/run_nightly.sh")
    assert timer["Timer"]["Unit"] == "inctrl-nightly.service"
    assert re.fullmatch(r"\*-\*-\* \d\d:\d\d:\d\d( UTC)?", timer["Timer"]["OnCalendar"])
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"
    settings = {}
    for line in open(os.path.join(DEPLOY, "systemd", "nightly.env.example")):
        if "=" in line and not line.startswith("#"):
            key, value = line.rstrip("\n").split("=", 1)
            settings[key] = value
    config, _, _ = parse_nightly_args(nightly_args(wrapper_command(**settings)))
    assert config.output == settings["INCTRL_OUTPUT"]


def beam_options_to_args(options: dict) -> list[str]:
    """How the Airflow Beam provider turns pipeline_options into flags (its own logic)."""
    args = []
    for attr, value in options.items():
        if value is None or (isinstance(value, bool) and value):
            args.append(f"--{attr}")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, list):
            args.extend(f"--{attr}={v}" for v in value)
        else:
            args.append(f"--{attr}={value}")
    return args


def render(value, context: dict):
    """The few Jinja expressions of the DAG, rendered as Airflow would for one run."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\{\{\s*(.*?)\s*\}\}", lambda m: context[m.group(1)], value)


def test_airflow_dag_runs_the_nightly_module_with_accepted_flags():
    path = os.path.join(DEPLOY, "airflow", "inctrl_nightly_dag.py")
    tree = ast.parse(open(path).read())
    options = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], "id", None) == "PIPELINE_OPTIONS")
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "BeamRunPythonPipelineOperator")
    kwargs = {k.arg: k.value for k in call.keywords}
    assert ast.literal_eval(kwargs["py_file"]) == "pipeline.nightly"
    assert ast.literal_eval(kwargs["py_options"]) == ["-m"]

    context = {"var.value.inctrl_manifest": "gs://b/m.parquet",
               "var.value.inctrl_output": "gs://b/out",
               "data_interval_start | ds": "2024-05-01"}
    rendered = {k: render(v, context) for k, v in options.items()}
    argv = ["--runner=DirectRunner", *beam_options_to_args(rendered)]
    config, opts, beam_args = parse_nightly_args(argv)
    assert (config.manifest, config.output, config.run_date) == ("gs://b/m.parquet",
                                                                 "gs://b/out", "2024-05-01")
    assert opts.fail_on_drift and beam_args == ["--runner=DirectRunner"]


def test_python_dash_m_pipeline_nightly_is_the_entry_point():
    out = subprocess.run([sys.executable, "-m", "pipeline.nightly", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--date" in out.stdout and "--force" in out.stdout


def test_airflow_dag_imports_when_airflow_is_installed():
    pytest.importorskip("airflow.providers.apache.beam")
    from airflow.models import DagBag

    bag = DagBag(os.path.join(DEPLOY, "airflow"), include_examples=False)
    assert not bag.import_errors and "inctrl_nightly" in bag.dags
