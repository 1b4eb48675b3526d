"""The shipped schedules (crontab line, systemd timer, Airflow DAG) start the nightly job with
flags it accepts, checked offline without cron, systemd or Airflow."""
from __future__ import annotations

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


def test_python_dash_m_pipeline_nightly_is_the_entry_point():
    out = subprocess.run([sys.executable, "-m", "pipeline.nightly", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--date" in out.stdout and "--force" in out.stdout
