"""The job over every kind of bad input: it completes and accounts for every row.

Each manifest row of tests/badinputs carries what must become of it (``expect``): scored
once per seed, an error row once per seed, or (references) nothing in either table.
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.core.config import ScoreConfig
from pipeline.core.manifest import normalize_row, write_manifest
from pipeline.core.sampling import draw_references
from pipeline.core.schemas import ERROR_SCHEMA, ERRORS, SCORES
from pipeline.model.backbone import tiny_spec
from pipeline.run import run_score
from tests import badinputs
from tests.beamtest import Run, counter, read_table

K = 4
SEEDS = (0, 1)
RUN_DATE = "2024-03-06"
STAGES = {"read_manifest", "deduplicate", "select_references", "read_image", "decode_image",
          "preprocess_image", "score"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("bad")
    frame = badinputs.build_bad_inputs(str(root / "data"))
    path = str(root / "manifest.parquet")
    write_manifest(frame, path)
    config = ScoreConfig(manifest=path, output=str(root / "out"), k=K, seeds=SEEDS,
                         backbone=tiny_spec(), run_date=RUN_DATE, run_id="bad-run", batch_size=4,
                         max_failed_fraction=1.0)  # its rows fail on purpose: commit them
    result = run_score(config, beam_args=[])
    return Run(config, frame, result, read_table(config.output, SCORES),
               read_table(config.output, ERRORS))


def _case(run: Run, case: str):
    """The manifest row (a namedtuple) of one bad-input case."""
    (row,) = run.manifest[run.manifest.case == case].itertuples()
    return row


def _seeds(frame: pd.DataFrame, uri: str) -> list:
    """Seeds of a table's rows for one image, None for rows without a seed."""
    seeds = frame.loc[frame.image_uri == uri, "seed"]
    return sorted((None if pd.isna(s) else int(s) for s in seeds), key=lambda s: (s is not None, s))


def test_every_row_ends_as_expected(run):
    assert set(run.scores.image_uri) | set(run.errors.image_uri) <= set(run.manifest.image_uri)
    outcome, expected = {}, {}
    for row in run.manifest.itertuples():
        outcome[row.case] = (_seeds(run.scores, row.image_uri), _seeds(run.errors, row.image_uri))
        if row.expect == "reference":
            expected[row.case] = ([], [])
        elif row.expect == "score":
            expected[row.case] = (list(SEEDS), [])
        elif row.role == "query":
            expected[row.case] = ([], list(SEEDS))
        else:  # not a query (unknown role): one error row, for no seed in particular
            expected[row.case] = ([], [None])
    assert outcome == expected


def test_error_rows_are_readable(run):
    assert not run.errors.empty
    assert set(run.errors.stage) <= STAGES
    for rec in run.errors.itertuples():
        assert isinstance(rec.reason, str) and len(rec.reason) > 10
        assert "Traceback" not in rec.reason
        assert rec.run_id == "bad-run"
        if pd.isna(rec.scorer):  # a row of no scorer (a reference, a rejected row): no model
            assert pd.isna(rec.model_id)
        else:
            assert "TESTONLY" in rec.model_id
    stage = run.errors.set_index("image_uri").stage
    assert stage[_case(run, "missing_file").image_uri].eq("read_image").all()
    assert stage[_case(run, "corrupt_png").image_uri].eq("decode_image").all()


def test_errors_schema(run):
    schema = pads.dataset(f"{run.config.output}/{ERRORS}", format="parquet",
                          partitioning="hive").schema
    assert list(schema) == list(ERROR_SCHEMA) + [pa.field("dataset", pa.string()),
                                                 pa.field("run_date", pa.string())]
    assert set(run.errors.dataset) == {badinputs.DATASET}


def test_fewer_references_than_k_scores_with_what_there_is(run):
    few = run.scores[run.scores.category == badinputs.FEW_REFS]
    assert len(few) == 2 * len(SEEDS)
    assert (few.k == K).all()
    assert (few.k_used == badinputs.N_FEW_REFERENCES).all()
    refs = [normalize_row(r) for r in run.manifest[
        (run.manifest.category == badinputs.FEW_REFS)
        & (run.manifest.role == "reference")].to_dict("records")]
    for rec in few.itertuples():
        assert list(rec.reference_ids) == [r.image_id for r in draw_references(refs, rec.seed, K)]


def test_enough_references_use_k(run):
    enough = run.scores[run.scores.category != badinputs.FEW_REFS]
    assert not enough.empty
    assert (enough.k_used == K).all()


def test_category_without_references_names_it(run):
    errors = run.errors[run.errors.category == badinputs.NO_REFS]
    assert len(errors) == 2 * len(SEEDS)
    assert (errors.stage == "score").all()
    assert errors.reason.str.contains(repr(badinputs.NO_REFS), regex=False).all()


def test_unknown_role_and_duplicate_id(run):
    role = run.errors[run.errors.image_uri == _case(run, "unknown_role").image_uri]
    assert list(role.stage) == ["read_manifest"]
    assert "unknown role 'train'" in role.reason.iloc[0]

    first = _case(run, "duplicate_id_first")
    second = _case(run, "duplicate_id_second")
    dup = run.errors[run.errors.image_uri == second.image_uri]
    assert sorted(dup.seed) == list(SEEDS)
    assert (dup.stage == "deduplicate").all()
    assert dup.reason.str.contains(second.image_id).all()
    assert dup.reason.str.contains(first.image_uri, regex=False).all()


def test_passthrough_columns_reach_the_scores(run):
    assert run.scores["expect"].eq("score").all()
    by_uri = run.manifest.set_index("image_uri")
    for rec in run.scores.itertuples():
        assert rec.case == by_uri.loc[rec.image_uri, "case"]


def test_failure_counters(run):
    m = run.manifest
    broken = m[(m.category == badinputs.BROKEN) & (m.expect == "error")]
    assert counter(run.result, "manifest_rows_read") == len(m)
    assert counter(run.result, "manifest_rows_rejected") == 1  # the unknown role
    assert counter(run.result, "manifest_rows_duplicate") == 1
    assert counter(run.result, "images_failed") == len(broken)
    assert counter(run.result, "queries_failed") == 2 * len(SEEDS)  # the no-reference queries
    assert counter(run.result, "queries_scored") == len(run.scores)
    assert counter(run.result, "errors_rows_written") == len(run.errors)
