"""LoadImages with a decode thread pool: same rows, same order, same errors, same scores.

The pool only changes where the decoding runs. A job over every kind of bad input must write
the same scores and error rows with 3 decode threads as with 1 (inline), and the DoFn must
keep input order, carry each row's window and timestamp, bound the rows in flight and emit
every row of a bundle by the bundle's end, whatever order the threads finish in.
"""
from __future__ import annotations

import random
import threading
import time

import pandas as pd
import pytest
import torch
from apache_beam.transforms.window import GlobalWindow, IntervalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.core.config import ScoreConfig, default_decode_threads
from pipeline.core.images import ImageLimits
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, ERRORS as ERROR_TAG, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.model.scorers.suite import SuiteSpec
from pipeline.run import run_score
from tests import badinputs
from tests.beamtest import counter, mrow, read_table
from transforms import images as images_mod
from transforms.errors import row_error
from transforms.images import Loaded, _LoadFn

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bad-threads")
    path = str(root / "manifest.parquet")
    write_manifest(badinputs.build_bad_inputs(str(root / "data")), path)
    return path


def _job(manifest: str, output: str, threads: int):
    config = ScoreConfig(manifest=manifest, output=output, k=4, seeds=SEEDS, backbone=tiny_spec(),
                         run_date="2024-03-07", run_id="threads", batch_size=4,
                         decode_threads=threads,
                         max_failed_fraction=1.0)  # the bad inputs fail on purpose
    result = run_score(config, beam_args=[])
    order = ["dataset", "category", "image_id", "image_uri", "seed"]
    tables = [read_table(output, t).sort_values(order, na_position="first").reset_index(drop=True)
              for t in (SCORES, ERRORS)]
    return result, *tables


@pytest.fixture(scope="module")
def jobs(bad_manifest, tmp_path_factory):
    return {threads: _job(bad_manifest, str(tmp_path_factory.mktemp(f"t{threads}")), threads)
            for threads in (1, 3)}


def test_threaded_job_writes_identical_scores_and_errors(jobs):
    _, scores1, errors1 = jobs[1]
    _, scores3, errors3 = jobs[3]
    assert len(scores1) > 0 and len(errors1) > 0
    pd.testing.assert_frame_equal(scores3, scores1)
    pd.testing.assert_frame_equal(errors3, errors1)


def test_threaded_job_counts_every_image_once(jobs):
    inline, threaded = jobs[1][0], jobs[3][0]
    for name in ("images_loaded", "images_failed"):
        assert counter(threaded, name) == counter(inline, name) > 0, name


# --- the DoFn on its own, with a loader that finishes rows out of order ---------------------

def _outcome(row) -> Loaded:
    if row.image_id.startswith("bad"):
        return Loaded(row, error=row_error(row, "decode_image", "broken on purpose"))
    return Loaded(row, torch.full((3, 2, 2), float(row.image_id[1:])), f"sha-{row.image_id}", 10)


class _SlowLoader:
    """Sleeps a random time per row; records the most rows ever in progress at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.rng = random.Random(0)

    def __call__(self, row, preprocess, limits) -> Loaded:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            pause = self.rng.uniform(0, 0.004)
        time.sleep(pause)
        with self.lock:
            self.running -= 1
        return _outcome(row)


def _unwrap(out):
    tag = out.tag if hasattr(out, "tag") else None
    value = out.value if hasattr(out, "tag") else out
    return tag, value


@pytest.mark.parametrize("threads,prefetch", [(1, 0), (4, 0), (4, 16), (3, 1)])
def test_rows_come_out_in_order_with_their_windows(monkeypatch, threads, prefetch):
    loader = _SlowLoader()
    monkeypatch.setattr(images_mod, "load_row", loader)
    fn = _LoadFn(SuiteSpec(clip=tiny_spec()), ImageLimits(max_pixels=10**8), threads=threads,
                 prefetch=prefetch)
    fn.setup()
    rows = [mrow(f"bad{i}" if i % 7 == 3 else f"q{i}", role="query") for i in range(60)]
    window = IntervalWindow(0, 100)
    stamps = [Timestamp(i) for i in range(len(rows))]

    fn.start_bundle()
    outputs = []
    for row, stamp in zip(rows, stamps):
        outputs += [(row.image_id, o) for o in
                    fn.process(row, timestamp=stamp, window=window)]
    outputs += [(None, o) for o in fn.finish_bundle() or ()]

    seen = []
    for fed, out in outputs:
        tag, value = _unwrap(out)
        if threads == 1:  # inline: plain values, emitted while their own row is processed
            assert not isinstance(value, WindowedValue)
            image_id = value.image_id if tag else value[0][0].image_id
            assert image_id == fed
        else:
            assert isinstance(value, WindowedValue) and value.windows == (window,)
            image_id = value.value.image_id if tag else value.value[0][0].image_id
            assert value.timestamp == stamps[int(image_id[3:] if tag else image_id[1:])]
            value = value.value
        if tag:
            assert tag == ERROR_TAG and value.reason == "broken on purpose"
        else:
            (row, sha), pixels = value
            assert sha == f"sha-{row.image_id}"
            assert pixels[0, 0, 0].item() == float(row.image_id[1:])
        seen.append(image_id)
    assert seen == [r.image_id for r in rows]
    assert loader.most <= threads


def test_in_flight_rows_are_bounded_by_prefetch(monkeypatch):
    gate = threading.Event()
    started = []

    def blocked(row, *_):
        started.append(row.image_id)
        gate.wait(5)
        return _outcome(row)

    monkeypatch.setattr(images_mod, "load_row", blocked)
    fn = _LoadFn(SuiteSpec(clip=tiny_spec()), ImageLimits(max_pixels=10**8), threads=2, prefetch=5)
    fn.setup()
    fn.start_bundle()
    rows = [mrow(f"q{i}", role="query") for i in range(5)]
    for row in rows:  # up to `prefetch` rows are queued without waiting for any
        assert list(fn.process(row, timestamp=Timestamp(0), window=GlobalWindow())) == []
    assert len(fn._pending) == 5
    gate.set()
    out = list(fn.process(mrow("q5", role="query"), timestamp=Timestamp(0), window=GlobalWindow()))
    assert len(out) >= 1 and len(fn._pending) <= 5
    rest = list(fn.finish_bundle())
    assert len(out) + len(rest) == 6 and not fn._pending


def test_decode_threads_default_by_device():
    assert default_decode_threads(tiny_spec()) == 1
    assert 1 <= default_decode_threads(tiny_spec(device="cuda")) <= 8


def test_decode_threads_must_be_positive():
    with pytest.raises(ValueError, match="decode threads"):
        _LoadFn(SuiteSpec(clip=tiny_spec()), ImageLimits(max_pixels=10**8), threads=0)
    with pytest.raises(ValueError, match="decode_threads"):
        ScoreConfig(manifest="m", output="o", decode_threads=-1)
