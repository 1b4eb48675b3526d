"""Airflow DAG: the nightly InCTRL inspection run, one DAG run per capture date.

Each run covers one day, 02:15 UTC to 02:15 UTC, and scores the queries captured on the day
its data interval starts (``{{ data_interval_start | ds }}``: yesterday for the run at 02:15
today) with ``python -m pipeline.nightly`` through the Apache Beam provider's
``BeamRunPythonPipelineOperator``. Backfills (``airflow dags backfill``) and clearing a
task rerun a date safely: the job replaces that date's partition atomically and scores only
the queries not yet scored (``--force`` rescores all).

Needs ``apache-airflow-providers-apache-beam`` on the Airflow workers and this package in the
interpreter named by the ``INCTRL_PYTHON`` environment variable of the worker (default
``python3``; e.g. ``/opt/inctrl-beam/.venv/bin/python``). Airflow Variables, read when a task
runs: ``inctrl_manifest``, ``inctrl_output`` and ``inctrl_runner`` (default DirectRunner; or
DaskRunner, FlinkRunner, DataflowRunner ...). Runner flags (``dask_client_address``, the
Dataflow flags of ``deploy/run_dataflow.sh`` ...) go into ``PIPELINE_OPTIONS`` below.
"""
from __future__ import annotations

import datetime as dt
import os

from airflow import DAG
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.timetables.interval import CronDataIntervalTimetable

# Options of `python -m pipeline nightly`; the operator turns each into --key=value
# (True into a bare --key) after --runner. Templated when the task runs.
PIPELINE_OPTIONS = {
    "manifest": "{{ var.value.inctrl_manifest }}",
    "output": "{{ var.value.inctrl_output }}",
    "date": "{{ data_interval_start | ds }}",
    "k": "4",
    "seeds": "0,1,2",
    "backbone": "ViT-B-16-plus-240",
    "pretrained": "laion400m_e31",
    "alert-threshold": "0.5",
    "fail-on-drift": True,
}

with DAG(
    dag_id="inctrl_nightly",
    description="Score each night's inspection images with InCTRL and report score drift",
    # A data interval per day, the same in Airflow 2 and 3: the date is the interval's start.
    schedule=CronDataIntervalTimetable("15 2 * * *", timezone="UTC"),
    start_date=dt.datetime(2024, 1, 1),
    catchup=False,  # set True to backfill every date since start_date
    max_active_runs=1,  # nights write the same feature cache; run them one at a time
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=15)},
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
