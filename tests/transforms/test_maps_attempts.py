"""The anomaly-map writer's files are unique to the run and to the bundle attempt: Beam retries
a failed bundle, and the retry must neither write onto the first attempt's files nor let
them into the record. The DoFn is driven through its lifecycle as a runner would: a first
attempt that fails after writing (no finish_bundle), then the retry."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from pipeline.core.commit import Staged, commit_run
from pipeline.core.config import ScoreConfig
from pipeline.core.layout import MAPS, current_files
from pipeline.core.lease import date_lease
from pipeline.model.backbone import tiny_spec
from transforms.maps import FILES, GRID_KEY, PATCH_MAP_KEY, SIZE_KEY, _MapsFn
from transforms.write import ATTEMPT

DATE = "2024-10-01"


def record(image: str, dataset: str = "d") -> dict:
    rng = np.random.default_rng(0)
    return {"dataset": dataset, "image_id": os.path.basename(image), "image_uri": image,
            "seed": 0, "scorer": "inctrl", "category": "c", "label": 1, "k": 1,
            PATCH_MAP_KEY: rng.random(16, dtype=np.float32), GRID_KEY: (4, 4),
            SIZE_KEY: (20, 24)}


def attempt(fn: _MapsFn, records: list[dict], *, fails: bool) -> tuple[list, list]:
    """One bundle attempt: (score records out, ATTEMPT elements reported)."""
    fn.start_bundle()
    scores = []
    for rec in records:
        for out in fn.process(dict(rec)):
            if not hasattr(out, "tag"):
                scores.append(out)
    if fails:
        return scores, []  # the runner drops everything this attempt emitted
    reported = [out.value.value for out in fn.finish_bundle() if out.tag == FILES]
    return scores, reported


def test_a_retried_bundle_writes_a_new_folder_and_only_the_retry_is_committed(tmp_path):
    image = str(tmp_path / "q.png")
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(image)
    out = str(tmp_path / "out")
    config = ScoreConfig(manifest="unused", output=out, k=1, seeds=(0,), backbone=tiny_spec(),
                         run_date=DATE, run_id="r", write_anomaly_maps=True)
    with date_lease(out, DATE, "r") as plan:
        fn = _MapsFn(config, plan, write=True, pixel=False)
        fn.setup()
        first, _ = attempt(fn, [record(image)], fails=True)
        retry, reported = attempt(fn, [record(image)], fails=False)
        (kind, table, dataset, attempt_id), = reported
        assert (kind, table, dataset) == (ATTEMPT, MAPS, "d")
        # Two attempts, two folders: the retry wrote beside the first, not onto it.
        assert first[0]["anomaly_map_uri"] != retry[0]["anomaly_map_uri"]
        assert os.path.isfile(first[0]["anomaly_map_uri"])
        assert f"/run={plan.commit_id}/dataset=d/{attempt_id}/" in retry[0]["anomaly_map_uri"]
        # What the job's commit step makes of the elements it received.
        commit_run(plan, Staged(datasets=("d",),
                                attempts=tuple((t, d, a) for _, t, d, a in reported)))
        in_force = set(current_files(out, MAPS, DATE))
        assert in_force == {retry[0]["anomaly_map_uri"], retry[0]["overlay_uri"]}
    # The failed attempt's files were garbage: gone when the run ended.
    assert not os.path.exists(first[0]["anomaly_map_uri"])
    assert all(os.path.isfile(p) for p in in_force)
