"""Queries reach scoring grouped by (dataset, category): reference work stays once per group.

ScoreQueries keeps a bounded cache of prepared reference sets per worker. Were queries spread
one by one (a manifest interleaving product lines, say by capture time), nearly every batch
would mix groups and evict each other's references, so reference work would grow with the
queries instead of the groups. Here the cache holds only 2 sets while 12 (category, seed)
groups are interleaved in the manifest; the job must still prepare each exactly once.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

import transforms.score as score_mod
from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from pipeline.runner import distribution_max
from tests.beamtest import counter, mrow, read_table
from transforms.images import SpreadByGroup, _group_chunks

CATEGORIES = [f"line{i}" for i in range(6)]
QUERIES = 4
SEEDS = (0, 1)


@pytest.mark.parametrize("n,size,expected", [(0, 3, []), (5, 5, [5]), (7, 3, [3, 3, 1]),
                                             (2, 8, [2])])
def test_group_chunks_split_a_group_in_order(n, size, expected):
    rows = [mrow(f"q{i}", role="query") for i in range(n)]
    chunks = list(_group_chunks((("ds", "cat"), iter(rows)), size))
    assert [len(c) for c in chunks] == expected
    assert [r for c in chunks for r in c] == rows


def test_spread_by_group_keeps_every_row_once(test_pipeline):
    rows = [mrow(f"{c}-{i}", role="query", category=c, dataset=d)
            for d in ("a", "b") for c in ("x", "y", "z") for i in range(5)]
    with test_pipeline() as p:
        out = p | beam.Create(rows[::-1]) | SpreadByGroup(chunk=2)
        assert_that(out | beam.Map(lambda r: r.image_id), equal_to([r.image_id for r in rows]))


def test_spread_by_group_refuses_empty_chunks():
    with pytest.raises(ValueError, match="chunk"):
        SpreadByGroup(0)


@pytest.fixture(scope="module")
def interleaved_manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("interleaved")
    rng = np.random.default_rng(5)
    rows = []
    for c, category in enumerate(CATEGORIES):
        for i in range(1 + QUERIES):  # one reference, then the queries
            path = root / f"{category}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
            rows.append(dict(image_uri=str(path), image_id=f"{category}-{i}", dataset="plant",
                             category=category, role="reference" if i == 0 else "query",
                             label=int(i % 2 == 0) if i else 0))
    frame = pd.DataFrame(rows).sample(frac=1, random_state=3)  # product lines interleaved
    assert frame.category.iloc[:6].nunique() > 3
    path = str(root / "manifest.parquet")
    write_manifest(frame, path)
    return path


def test_each_group_prepares_its_references_once(interleaved_manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(score_mod, "_PREPARED_CACHE", 2)
    config = ScoreConfig(manifest=interleaved_manifest, output=str(tmp_path / "out"), k=1,
                         seeds=SEEDS, backbone=tiny_spec(), batch_size=2, run_id="grouped",
                         run_date="2024-06-01", semantic_classes=frozenset(CATEGORIES))
    result = run_score(config, beam_args=[])
    scores = read_table(config.output, SCORES)
    assert len(scores) == len(CATEGORIES) * QUERIES * len(SEEDS)
    assert counter(result, "queries_scored") == len(scores)
    assert counter(result, "reference_sets_prepared") == len(CATEGORIES) * len(SEEDS)
    # the worker never held more groups' memories than its cache allows (issue 22)
    assert 1 <= distribution_max(result, "reference_sets_held") <= 2
