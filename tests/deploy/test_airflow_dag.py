"""The Airflow DAG (deploy/airflow/inctrl_nightly_dag.py) runs the nightly job for the right date.

The first tests need no Airflow. They render the DAG's templated options with Jinja, as Airflow
does for a scheduled run and for manual runs with and without the ``date`` param, and they
parse the resulting flags with the nightly CLI. The ``with_airflow`` tests need Airflow and the
Beam and Google providers (deploy/airflow/requirements-airflow.txt), so they skip in CI. They
load the DAG with Airflow and capture the command line that the operator itself builds. They
never import this project, whose dependencies are not in Airflow's environment:

    AIRFLOW_HOME=/tmp/airflow-home /tmp/airflow-venv/bin/python -m pytest tests/deploy \
        -k with_airflow
"""
from __future__ import annotations

import ast
import copy
import datetime as dt
import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import jinja2
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AIRFLOW_DIR = os.path.join(REPO, "deploy", "airflow")
DAG_FILE = os.path.join(AIRFLOW_DIR, "inctrl_nightly_dag.py")
VARIABLES = {"inctrl_manifest": "gs://b/m.parquet", "inctrl_output": "gs://b/out"}
UTC = dt.timezone.utc
# The run at 2024-05-02 02:15 UTC covers 2024-05-01 02:15 to 2024-05-02 02:15.
SCHEDULED_START = dt.datetime(2024, 5, 1, 2, 15, tzinfo=UTC)
# What Airflow gives `airflow dags test inctrl_nightly 2024-05-02`: the last complete interval.
MANUAL_START = dt.datetime(2024, 4, 30, 2, 15, tzinfo=UTC)


def dag_source() -> ast.Module:
    with open(DAG_FILE) as f:
        return ast.parse(f.read())


def dag_options() -> dict:
    """PIPELINE_OPTIONS of the DAG file, read without Airflow."""
    return next(ast.literal_eval(n.value) for n in dag_source().body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "PIPELINE_OPTIONS")


def dag_runner_template() -> str:
    call = next(n for n in ast.walk(dag_source()) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "BeamRunPythonPipelineOperator")
    return next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "runner")


def render(template, context: dict):
    """One templated value, as Airflow renders it: strict undefined, Airflow's ``ds`` filter."""
    if not isinstance(template, str):
        return template
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["ds"] = lambda value: None if value is None else value.strftime("%Y-%m-%d")
    return env.from_string(template).render(**context)


def ds_add(ds: str, days: int) -> str:
    """Airflow's ``macros.ds_add``."""
    return (dt.date.fromisoformat(ds) + dt.timedelta(days=days)).isoformat()


def run_context(date: str | None = None, data_interval_start: dt.datetime | None = None,
                run_after: dt.datetime | None = None) -> dict:
    """The template context of one DAG run. Without an interval it has no data_interval_start."""
    context = {"params": {"date": date}, "var": {"value": VARIABLES},
               "macros": SimpleNamespace(ds_add=ds_add),
               "dag_run": SimpleNamespace(run_after=run_after or data_interval_start)}
    if data_interval_start is not None:
        context["data_interval_start"] = data_interval_start
    return context


def operator_args(context: dict, airflow_version: str = "3.3.2") -> list[str]:
    """The flags that BeamRunPythonPipelineOperator (Beam provider 6.x) passes after the module.

    It renders the templates, adds an ``airflow-version`` label, and then writes ``--runner``
    followed by ``--key=value`` for each option (a bare ``--key`` for True, one flag per label).
    """
    options = {key: render(value, context) for key, value in dag_options().items()}
    options["labels"] = ["airflow-version=v" + airflow_version.replace(".", "-").replace("+", "-")]
    args = [f"--runner={render(dag_runner_template(), context)}"]
    for key, value in options.items():
        if value is True:
            args.append(f"--{key}")
        elif isinstance(value, list):
            args.extend(f"--{key}={v}" for v in value)
        elif value is not None and value is not False:
            args.append(f"--{key}={value}")
    return args


def nightly_args(context: dict):
    # Imported here: the with_airflow tests run in Airflow's environment, without the job's.
    from pipeline.cli.nightly import parse_nightly_args

    return parse_nightly_args(operator_args(context))


@pytest.mark.parametrize("context, date", [
    pytest.param(run_context(data_interval_start=SCHEDULED_START), "2024-05-01", id="scheduled"),
    pytest.param(run_context("2024-05-02", MANUAL_START), "2024-05-02", id="manual-with-date"),
    pytest.param(run_context(None, MANUAL_START), "2024-04-30", id="manual-without-date"),
    pytest.param(run_context("", MANUAL_START), "2024-04-30", id="manual-empty-date"),
    # Airflow 3 `dags trigger` without --logical-date: no data interval.
    pytest.param(run_context(None, run_after=dt.datetime(2024, 5, 3, 1, 0, tzinfo=UTC)),
                 "2024-05-02", id="manual-without-interval"),
])
def test_the_job_scores_the_date_param_else_the_interval_start(context, date):
    config, options, beam_args = nightly_args(context)
    assert config.run_date == date
    assert (config.manifest, config.output) == ("gs://b/m.parquet", "gs://b/out")
    assert options.fail_on_drift
    assert beam_args == ["--runner=DirectRunner", "--labels=airflow-version=v3-3-2"]


def test_the_date_param_defaults_to_none_so_scheduled_runs_use_their_interval():
    dag_call = next(n for n in ast.walk(dag_source()) if isinstance(n, ast.Call)
                    and getattr(n.func, "id", None) == "DAG")
    params = next(k.value for k in dag_call.keywords if k.arg == "params")
    (date,) = [v for k, v in zip(params.keys, params.values) if ast.literal_eval(k) == "date"]
    assert getattr(date.func, "id", None) == "Param"
    assert ast.literal_eval(date.args[0]) is None


def test_the_runner_variable_becomes_the_beam_runner():
    context = run_context(data_interval_start=SCHEDULED_START)
    context["var"]["value"] = {**VARIABLES, "inctrl_runner": "DaskRunner"}
    _, _, beam_args = nightly_args(context)
    assert beam_args[0] == "--runner=DaskRunner"


def requirement_pins(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                assert version, f"{line} of {path} is not pinned"
                pins[name.lower()] = version
    return pins


def test_airflow_requirements_pin_both_providers_and_the_jobs_beam():
    airflow = requirement_pins(os.path.join(AIRFLOW_DIR, "requirements-airflow.txt"))
    worker = requirement_pins(os.path.join(REPO, "deploy", "requirements-worker.txt"))
    assert {"apache-airflow", "apache-airflow-providers-apache-beam",
            "apache-airflow-providers-google"} <= set(airflow)
    assert airflow["apache-beam"] == worker["apache-beam"]


# --- With Airflow: skipped unless Airflow and both providers are installed ------------------

@pytest.fixture
def airflow_dagbag(monkeypatch):
    """The DAG folder as Airflow loads it; the job's interpreter is this one (it has Beam)."""
    pytest.importorskip("airflow.providers.apache.beam")
    pytest.importorskip("airflow.providers.google")
    from airflow.models import DagBag

    monkeypatch.setenv("INCTRL_PYTHON", sys.executable)
    # Airflow 3.3's DagBag has no include_examples (examples follow [core] load_examples).
    kwargs = ({"include_examples": False}
              if "include_examples" in inspect.signature(DagBag).parameters else {})
    return DagBag(AIRFLOW_DIR, **kwargs)


@pytest.fixture
def airflow_dag(airflow_dagbag):
    return airflow_dagbag.dags["inctrl_nightly"]


def test_with_airflow_the_dag_loads_without_import_errors(airflow_dagbag):
    assert not airflow_dagbag.import_errors, airflow_dagbag.import_errors
    dag = airflow_dagbag.dags["inctrl_nightly"]
    assert dag.params["date"] is None
    assert dag.get_task("score_night").py_interpreter == sys.executable


def operator_command(dag, conf: dict, context: dict) -> list[str]:
    """The command that the DAG's task runs for a DAG run with ``conf``.

    The task's templates are rendered with ``context``, then the operator is executed with the
    Beam hook's process runner stubbed out.
    """
    from airflow.providers.apache.beam.hooks import beam as beam_hook

    task = dag.get_task("score_night")
    params = copy.deepcopy(dag.params)
    params.update(conf)  # dag_run.conf overrides params, keeping their schema
    context = {**context, "params": params.validate()}
    task.render_template_fields(context)
    commands = []
    with mock.patch.object(beam_hook, "run_beam_command",
                           lambda cmd, **_: commands.append(cmd)):
        task.execute(context)
    (command,) = commands
    return command


@pytest.mark.parametrize("conf, start, date", [
    pytest.param({}, SCHEDULED_START, "2024-05-01", id="scheduled"),
    pytest.param({"date": "2024-05-02"}, MANUAL_START, "2024-05-02", id="manual-with-date"),
])
def test_with_airflow_the_operator_runs_the_nightly_module_for_the_date(airflow_dag, conf, start,
                                                                       date):
    from airflow.version import version

    context = run_context(data_interval_start=start)
    command = operator_command(airflow_dag, conf, context)
    assert command[:4] == [sys.executable, "-m", "pipeline.nightly", "--runner=DirectRunner"]
    assert [a for a in command if a.startswith("--date")] == [f"--date={date}"]
    # Exactly the flags that the tests above parse with the nightly CLI.
    assert command[3:] == operator_args(run_context(conf.get("date"), start), version)


def test_with_airflow_a_date_param_must_be_a_date(airflow_dag):
    from airflow.exceptions import ParamValidationError

    params = copy.deepcopy(airflow_dag.params)
    with pytest.raises(ParamValidationError):
        params.update({"date": "05/02/2024"})
        params.validate()


DAGS_TEST = """
import inspect, json, sys
from unittest import mock

import pendulum
from airflow.models import DagBag
from airflow.providers.apache.beam.hooks import beam as beam_hook

try:  # Airflow 2: DagRunNote refers to the FAB provider's user table
    import airflow.providers.fab.auth_manager.models  # noqa: F401
except ImportError:
    pass

commands = []
with mock.patch.object(beam_hook, "run_beam_command", lambda cmd, **_: commands.append(cmd)):
    for logical_date, conf in json.loads(sys.argv[2]):
        # A fresh DAG per run, as a worker parses it: in one process, the conf of a run stays
        # in the task's params and leaks into the next run.
        dag = DagBag(sys.argv[1]).dags["inctrl_nightly"]
        dag.get_task("score_night").retries = 0
        date_arg = ("logical_date" if "logical_date" in inspect.signature(dag.test).parameters
                    else "execution_date")  # Airflow 2
        dag.test(**{date_arg: logical_date and pendulum.parse(logical_date)}, run_conf=conf)
with open(sys.argv[3], "w") as f:
    json.dump(commands, f)
"""


def test_with_airflow_dags_test_scores_the_date_param_else_the_inferred_interval(tmp_path):
    """``airflow dags test`` (``DAG.test``) on SQLite, for three manual runs, job stubbed out."""
    pytest.importorskip("airflow.providers.apache.beam")
    pytest.importorskip("airflow.providers.google")
    from airflow.version import version

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": AIRFLOW_DIR, "INCTRL_PYTHON": sys.executable,
           "PYTHONDONTWRITEBYTECODE": "1",
           **{f"AIRFLOW_VAR_{k.upper()}": v for k, v in VARIABLES.items()}}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)
    runs = [("2024-05-02", None), ("2024-05-02", {"date": "2024-05-02"})]
    if int(version.split(".")[0]) >= 3:  # a run without a logical date
        runs.append((None, None))
    out = tmp_path / "commands.json"
    before = dt.datetime.now(UTC).date()
    done = subprocess.run([sys.executable, "-c", DAGS_TEST, AIRFLOW_DIR, json.dumps(runs),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = dt.datetime.now(UTC).date()
    dates = [[a for a in command if a.startswith("--date=")]
             for command in json.loads(out.read_text())]
    assert dates[:2] == [["--date=2024-04-30"], ["--date=2024-05-02"]]
    if len(runs) == 3:  # no interval: the day before the run (either day around midnight)
        assert dates[2][0] in {f"--date={d - dt.timedelta(days=1)}" for d in (before, after)}
