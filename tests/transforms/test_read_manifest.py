"""ReadManifest: Parquet rows → normalised rows, bad rows and duplicates as error rows."""
from __future__ import annotations

import apache_beam as beam
import pandas as pd
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS
from pipeline.core.selection import ALL_ROWS
from tests.beamtest import counter
from transforms.manifest import ReadManifest, SelectQueries
from transforms.references import SelectReferences


def _write(tmp_path, rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int64")
    path = str(tmp_path / "manifest.parquet")
    write_manifest(frame, path)
    return path


def _row(uri: str, image_id: str, role: str = "query", label=0, **kw) -> dict:
    return dict(image_uri=uri, dataset="ds", category="cat", role=role, label=label,
                image_id=image_id, **kw)


def test_duplicate_image_id_keeps_the_smallest_uri(tmp_path, test_pipeline):
    # The smallest URI is listed last, so "first seen" would keep the wrong one.
    path = _write(tmp_path, [
        _row("/d/z.png", "dup"), _row("/d/m.png", "dup"), _row("/d/a.png", "dup"),
        _row("/d/ref.png", "dup", role="reference"),  # same id, other role: not a duplicate
        _row("/d/other.png", "other"),
    ])
    p = test_pipeline()
    out = p | ReadManifest(path)
    assert_that(out["rows"] | beam.Map(lambda r: (r.role, r.image_id, r.image_uri)),
                equal_to([("query", "dup", "/d/a.png"), ("reference", "dup", "/d/ref.png"),
                          ("query", "other", "/d/other.png")]), label="Rows")
    assert_that(out[ERRORS] | beam.Map(lambda e: (e.image_uri, e.stage, e.role,
                                                  "/d/a.png" in e.reason)),
                equal_to([("/d/m.png", "deduplicate", "query", True),
                          ("/d/z.png", "deduplicate", "query", True)]), label="Errors")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "manifest_rows_read") == 5
    assert counter(result, "manifest_rows_duplicate") == 2
    assert counter(result, "manifest_rows_rejected") == 0


def test_one_image_may_serve_several_datasets(tmp_path, test_pipeline):
    """A golden reference listed for two product lines is kept for both; a repeat within a
    dataset (even under another category) is still a duplicate."""
    golden = dict(image_uri="/d/golden.png", image_id="golden", role="reference", label=0)
    path = _write(tmp_path, [
        dict(golden, dataset="line-a", category="cat"),
        dict(golden, dataset="line-b", category="cat"),
        dict(golden, dataset="line-b", category="other", image_uri="/d/golden2.png"),
    ])
    p = test_pipeline()
    out = p | ReadManifest(path)
    assert_that(out["rows"] | beam.Map(lambda r: (r.dataset, r.category, r.image_uri)),
                equal_to([("line-a", "cat", "/d/golden.png"), ("line-b", "cat", "/d/golden.png")]),
                label="Rows")
    assert_that(out[ERRORS] | beam.Map(lambda e: (e.dataset, e.image_uri, e.stage)),
                equal_to([("line-b", "/d/golden2.png", "deduplicate")]), label="Errors")
    p.run().wait_until_finish()


def test_bad_rows_become_errors_and_good_rows_are_normalised(tmp_path, test_pipeline):
    path = _write(tmp_path, [
        _row(" /d/a.png ", None, role=" Query ", capture_date="2024-02-03T10:00:00"),
        _row("/d/b.png", "b", role="train"),
        _row("/d/c.png", "c", label=3),
        _row("", "d"),
    ])
    p = test_pipeline()
    out = p | ReadManifest(path)
    assert_that(out["rows"] | beam.Map(lambda r: (r.image_uri, r.role, r.capture_date,
                                                  len(r.image_id))),
                equal_to([("/d/a.png", "query", "2024-02-03", 16)]), label="Rows")
    assert_that(out[ERRORS] | beam.Map(lambda e: (e.image_id, e.stage)),
                equal_to([("b", "read_manifest"), ("c", "read_manifest"),
                          ("d", "read_manifest")]), label="Errors")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "manifest_rows_rejected") == 3


def test_folder_manifest_reads_every_data_file_validation_checks(tmp_path, test_pipeline):
    folder = tmp_path / "manifest"
    (folder / "day=1").mkdir(parents=True)
    pd.DataFrame([_row("/d/a.png", "a")]).astype({"label": "Int64"}).to_parquet(
        folder / "part-0.parquet")
    pd.DataFrame([_row("/d/b.png", "b")]).astype({"label": "Int64"}).to_parquet(
        folder / "day=1" / "part-1")  # nested, and no .parquet suffix
    (folder / "_SUCCESS").write_text("")
    p = test_pipeline()
    out = p | ReadManifest(str(folder))
    assert_that(out["rows"] | beam.Map(lambda r: r.image_id), equal_to(["a", "b"]))
    p.run().wait_until_finish()


def test_calibration_rows_are_read_but_neither_queries_nor_references(tmp_path, test_pipeline):
    """Calibration rows (normal images held out from the references) are valid manifest rows
    that the scoring job keeps out of both the queries and the reference draw, without an
    error row."""
    path = _write(tmp_path, [
        _row("/d/q.png", "q"), _row("/d/r0.png", "r0", role="reference"),
        _row("/d/r1.png", "r1", role="reference"),
        _row("/d/c0.png", "c0", role="calibration"), _row("/d/c1.png", "c1", role="Calibration"),
    ])
    p = test_pipeline()
    out = p | ReadManifest(path)
    queries = out["rows"] | SelectQueries(ALL_ROWS.is_query)
    refs = out["rows"] | SelectReferences(k=None, seeds=(0,))
    assert_that(out["rows"] | "Roles" >> beam.Map(lambda r: (r.image_id, r.role)),
                equal_to([("q", "query"), ("r0", "reference"), ("r1", "reference"),
                          ("c0", "calibration"), ("c1", "calibration")]), label="Rows")
    assert_that(queries | "QueryIds" >> beam.Map(lambda r: r.image_id), equal_to(["q"]),
                label="Queries")
    assert_that(refs["sets"] | beam.MapTuple(lambda key, rows: sorted(r.image_id for r in rows)),
                equal_to([["r0", "r1"]]), label="References")
    assert_that((out[ERRORS], refs[ERRORS]) | beam.Flatten(), equal_to([]), label="NoErrors")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "queries_selected") == 1
