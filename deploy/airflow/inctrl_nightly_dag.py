"""Airflow DAG: the nightly InCTRL inspection run, one DAG run per capture date.

Each run covers one day, 02:15 UTC to 02:15 UTC, and scores one capture date with
``python -m pipeline.nightly --date=...`` through the Apache Beam provider's
``BeamRunPythonPipelineOperator``. The date a run scores:

* **scheduled run**: the day its data interval starts (``data_interval_start | ds``):
  yesterday for the run at 02:15 today.
* **manual run** (UI "Trigger", ``airflow dags trigger``, ``airflow dags test``): the ``date``
  param, e.g. ``airflow dags trigger inctrl_nightly --conf '{"date": "2024-05-02"}'`` or
  ``airflow dags test inctrl_nightly 2024-05-02 --conf '{"date": "2024-05-02"}'``. Without it,
  the start of the interval that Airflow infers for the run, which is the last complete interval
  before the trigger time (before the logical date for ``airflow dags test``). So ``airflow dags
  test inctrl_nightly 2024-05-02`` scores 2024-04-30. A run that Airflow 3 triggers without a
  logical date has no interval, and it scores the day before it was triggered (UTC).
* **backfill** (Airflow 3: ``airflow backfill create --dag-id inctrl_nightly --from-date
  2024-04-28 --to-date 2024-05-02 --max-active-runs 1``; Airflow 2: ``airflow dags backfill -s
  ... -e ...``): one run per interval that starts (02:15 UTC) within the range, each scoring its
  start date as if scheduled. That example scores 2024-04-28 to 2024-05-01. Airflow 3 runs up to
  10 backfill runs at once whatever the DAG's ``max_active_runs``, hence ``--max-active-runs 1``.
  Leave ``date`` out of ``--dag-run-conf``, or every run scores that one date.
* **cleared task**: the date it scored before. The rerun keeps its DAG run's interval and conf.

Rerunning a date is safe: the job replaces that date's partition atomically and scores only
the queries not yet scored (``--force`` rescores all).

The Airflow workers need ``apache-airflow-providers-apache-beam`` **and**
``apache-airflow-providers-google``. Beam provider 6.x refuses to construct the operator
without the Google provider, even for the DirectRunner. ``requirements-airflow.txt`` pins the
tested versions. This package goes in the interpreter named by the ``INCTRL_PYTHON``
environment variable of the worker, not in Airflow's (default ``python3``; e.g.
``/opt/inctrl-beam/.venv/bin/python``). Airflow Variables, read when a task runs:
``inctrl_manifest``, ``inctrl_output`` and ``inctrl_runner`` (default DirectRunner; or
DaskRunner, FlinkRunner, DataflowRunner ...). Runner flags (``dask_client_address``, the
Dataflow flags of ``deploy/run_dataflow.sh`` ...) go into ``PIPELINE_OPTIONS`` below.
"""
from __future__ import annotations

import datetime as dt
import os

try:  # Airflow 3: the Task SDK
    from airflow.sdk import DAG, CronDataIntervalTimetable, Param
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.models.param import Param
    from airflow.timetables.interval import CronDataIntervalTimetable
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

# Options of `python -m pipeline nightly`; the operator turns each into --key=value
# (True into a bare --key) after --runner. Templated when the task runs.
PIPELINE_OPTIONS = {
    "manifest": "{{ var.value.inctrl_manifest }}",
    "output": "{{ var.value.inctrl_output }}",
    # The `date` param, else the start of the run's data interval, else (an Airflow 3 manual
    # run without a logical date has no interval) the day before the run was triggered.
    "date": "{{ params.date or (data_interval_start | ds if data_interval_start is defined"
            " else macros.ds_add(dag_run.run_after | ds, -1)) }}",
    "k": "4",
    "seeds": "0,1,2",
    "backbone": "ViT-B-16-plus-240",
    "pretrained": "laion400m_e32",
    # Each query's decision keeps this false-alarm rate; drift follows each line's anomaly rate.
    "false-alarm-rate": "0.05",
    "fail-on-drift": True,
}

with DAG(
    dag_id="inctrl_nightly",
    description="Score each night's inspection images with InCTRL and report score drift",
    # A data interval per day, the same in Airflow 2 and 3: the date is the interval's start.
    schedule=CronDataIntervalTimetable("15 2 * * *", timezone="UTC"),
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,  # set True to backfill every date since start_date
    # Nights write the same feature cache; run them one at a time. Airflow 3 backfills do not
    # count here: give them --max-active-runs 1.
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=15)},
    params={
        "date": Param(None, type=["null", "string"], format="date",
                      title="Capture date to score",
                      description="YYYY-MM-DD; empty: the start of the run's data interval"),
    },
    tags=["inctrl", "beam"],
) as dag:
    BeamRunPythonPipelineOperator(
        task_id="score_night",
        py_file="pipeline.nightly",
        py_options=["-m"],
        py_interpreter=os.environ.get("INCTRL_PYTHON", "python3"),
        runner="{{ var.value.get('inctrl_runner', 'DirectRunner') }}",
        pipeline_options=PIPELINE_OPTIONS,
        execution_timeout=dt.timedelta(hours=6),
    )
