"""The report of nightly outputs: three real nights of the nightly job (tiny test backbone),
then the report of the last night and of the first, checked against the nights' summary and
drift files."""
from __future__ import annotations

import html
import math
import re
from dataclasses import replace

import pandas as pd
import pytest

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import FEATURE_CACHE_DIR, summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import tiny_spec
from pipeline.nightly.drift import DRIFT
from pipeline.nightly.job import NightlyOptions, run_nightly
from pipeline.report import build_report
from pipeline.report.build import SECTION_FAILED
from pipeline.report.inputs import read_inputs
from pipeline.report.sections import QUANTILES, history_series
from tests.report.pagecheck import read_page

NIGHTS = ("2024-01-02", "2024-01-03", "2024-01-04")
#: Any move counts as drift, so the nights have alerts to show.
OPTIONS = NightlyOptions(drift_tolerance=0.0)
#: Two calibration images per group reach this false-alarm rate (n + 1 >= 1 / alpha), so
#: every query gets a decision and the nights have anomaly rates to show.
ALPHA, CALIBRATION = 0.4, 2


@pytest.fixture(scope="module")
def nights(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("nightly_report")
    manifest = make_manifest(generate_demo(str(root / "data"), image_size=32, n_train=2,
                                           n_test_good=1, n_test_defect_per_type=1,
                                           n_calibration=CALIBRATION))
    queries = manifest.index[manifest["role"] == "query"]
    manifest["capture_date"] = None
    manifest.loc[queries, "capture_date"] = [NIGHTS[i % len(NIGHTS)] for i in range(len(queries))]
    manifest.loc[manifest["role"] != "query", "capture_date"] = "2023-12-31"
    write_manifest(manifest, str(root / "manifest.parquet"))
    out = str(root / "out")
    base = ScoreConfig(manifest=str(root / "manifest.parquet"), output=out, k=2, seeds=(0,),
                       backbone=tiny_spec(), batch_size=4, false_alarm_rate=ALPHA,
                       feature_cache=f"{out}/{FEATURE_CACHE_DIR}")
    for date in NIGHTS:
        run_nightly(replace(base, run_date=date, run_id=f"night-{date}"), [], OPTIONS)
    return out


def _night_files(out: str, date: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = summary_dir(out, date)
    return pd.read_parquet(f"{folder}/summary.parquet"), pd.read_parquet(f"{folder}/drift.parquet")


def _section(text: str, dataset: str) -> str:
    found = re.search(r'<section class="dataset" id="[^"]*" data-dataset="'
                      + re.escape(html.escape(dataset, quote=True)) + '">', text)
    assert found, dataset
    return text[found.start():text.index("</section>", found.start())]


def _same(a: tuple[float, ...], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)
                                    for x, y in zip(a, b))


def test_history_holds_each_nights_quantiles_rates_and_alerts(nights):
    inputs = read_inputs(nights, NIGHTS[-1])
    files = {d: _night_files(nights, d) for d in NIGHTS}
    datasets = sorted(files[NIGHTS[-1]][1]["dataset"])
    assert len(datasets) == 3
    some_alert = False
    for dataset in datasets:
        history = history_series(inputs, dataset)
        assert history.dates == NIGHTS and history.scorer == "inctrl"
        for q in QUANTILES:
            want = []
            for date in NIGHTS:
                summary = files[date][0]
                row = summary[(summary["dataset"] == dataset)
                              & (summary["level"] == "dataset_pooled")]
                want.append(float(row[q].iloc[0]) if len(row) else math.nan)
            assert _same(history.quantiles[q], want), (dataset, q)
        rates, alerts = [], []
        for i, date in enumerate(NIGHTS):
            drift = files[date][1]
            row = drift[drift["dataset"] == dataset]
            rates.append(float(row["today_anomaly_rate"].iloc[0]) if len(row) else math.nan)
            if (row["status"] == DRIFT).any():
                alerts.append(i)
        assert _same(history.rate, rates), dataset
        assert all(r == r for r in rates), "every night has decisions"
        assert history.alerts == tuple(alerts), dataset
        assert 0 not in history.alerts  # the first night has nothing to drift from
        some_alert |= bool(alerts)
    assert some_alert, "no night alerted: the test would not see alert marks"


def test_the_last_nights_page_shows_drift_and_history(nights):
    with open(build_report(nights, NIGHTS[-1]), encoding="utf-8") as f:
        text = f.read()
    assert SECTION_FAILED not in text
    page = read_page(text)
    drift = _night_files(nights, NIGHTS[-1])[1]
    statuses = {c.attrs["data-dataset"]: c.text for c in page.cells
                if c.attrs.get("class", "").startswith("status ")}
    assert statuses == dict(zip(drift["dataset"], drift["status"]))
    inputs = read_inputs(nights, NIGHTS[-1])
    for dataset in drift["dataset"]:
        section = _section(text, dataset)
        assert f"Last {len(NIGHTS)} night(s)" in section
        assert "Score quantiles (inctrl)" in section and "Anomaly rate" in section
        # Each alert is marked on both history charts.
        alerts = history_series(inputs, dataset).alerts
        assert section.count('class="alert"') == 2 * len(alerts)
        for date in NIGHTS:
            assert f">{date[5:]}</text>" in section  # a tick per night
    assert "Nightly run" in text and "queries captured" in text


def test_history_nights_limits_the_window(nights):
    inputs = read_inputs(nights, NIGHTS[-1], history_nights=2)
    assert [n.date for n in inputs.history] == list(NIGHTS[-2:])
    with open(build_report(nights, NIGHTS[-1], history_nights=1), encoding="utf-8") as f:
        text = f.read()
    assert "Last 1 night(s)" in text and SECTION_FAILED not in text


def test_the_first_nights_page_has_nothing_to_compare_with(nights):
    with open(build_report(nights, NIGHTS[0]), encoding="utf-8") as f:
        text = f.read()
    assert SECTION_FAILED not in text
    page = read_page(text)
    statuses = {c.text for c in page.cells if c.attrs.get("class", "").startswith("status ")}
    assert statuses == {"new"}
    assert "Last 1 night(s)" in text and 'class="alert"' not in text
    # Later nights are not the first night's history.
    assert [n.date for n in read_inputs(nights, NIGHTS[0]).history] == [NIGHTS[0]]
