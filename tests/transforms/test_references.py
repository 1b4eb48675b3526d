"""SelectReferences / AssembleReferenceSets: the seeded few-shot draw, independent of execution."""
from __future__ import annotations

import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core.sampling import draw_references, sampler_rank
from pipeline.core.schemas import ERRORS
from tests.beamtest import mrow
from transforms.references import AssembleReferenceSets, SelectReferences, distinct_references

K = 3


def _candidates() -> list:
    """Two groups with more candidates than K, one with fewer, plus rows the draw must ignore."""
    rows = [mrow(f"a{i:02d}", category="a") for i in range(10)]
    rows += [mrow(f"b{i:02d}", category="b") for i in range(6)]
    rows += [mrow(f"c{i:02d}", category="c", label=None) for i in range(2)]
    rows += [mrow(f"q{i:02d}", category="a", role="query", label=i % 2) for i in range(4)]
    return rows


def _expected_sets(rows: list, seeds: tuple[int, ...], k: int) -> list:
    groups: dict = {}
    for r in rows:
        if r.role == "reference" and r.label != 1:
            groups.setdefault((r.dataset, r.category), []).append(r)
    return [((d, c, s), tuple(r.image_id for r in draw_references(members, s, k)))
            for (d, c), members in groups.items() for s in seeds]


def _ids(kv):
    key, rows = kv
    return key, tuple(r.image_id for r in rows)


def test_draw_references_is_k_smallest_ranks():
    rows = [mrow(f"x{i}") for i in range(8)]
    drawn = draw_references(rows, 5, K)
    ranks = sorted(sampler_rank(5, "ds", "cat", r.image_id) for r in rows)
    assert [sampler_rank(5, "ds", "cat", r.image_id) for r in drawn] == ranks[:K]
    assert draw_references(list(reversed(rows)), 5, K) == drawn


def test_same_draw_regardless_of_input_order_and_bundles(test_pipeline):
    rows = _candidates()
    seeds = (0, 1, 7)
    expected = _expected_sets(rows, seeds, K)
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    with test_pipeline() as p:
        # One bundle in manifest order; several bundles (one Create each) in shuffled order.
        one = p | "One" >> beam.Create(rows)
        parts = [p | f"Part{i}" >> beam.Create(shuffled[i::4]) for i in range(4)]
        many = parts | "Flatten" >> beam.Flatten()
        for label, pcoll in (("OneBundle", one), ("ManyBundles", many)):
            sets = pcoll | f"Select{label}" >> SelectReferences(K, seeds)
            assert_that(sets["sets"] | f"Ids{label}" >> beam.Map(_ids), equal_to(expected),
                        label=f"Check{label}")


def test_sets_hold_k_or_all_there_are(test_pipeline):
    rows = _candidates()
    sizes = {key: len(ids) for key, ids in _expected_sets(rows, (0,), K)}
    assert sizes == {("ds", "a", 0): K, ("ds", "b", 0): K, ("ds", "c", 0): 2}
    with test_pipeline() as p:
        sets = p | beam.Create(rows) | SelectReferences(K, (0,))
        assert_that(sets["sets"] | beam.MapTuple(lambda key, refs: (key, len(refs))),
                    equal_to(list(sizes.items())))


def test_different_seeds_draw_different_sets_when_candidates_exceed_k(test_pipeline):
    rows = [mrow(f"a{i:02d}", category="a") for i in range(10)]
    draws = {s: tuple(r.image_id for r in draw_references(rows, s, K)) for s in (0, 1)}
    assert draws[0] != draws[1]
    with test_pipeline() as p:
        sets = p | beam.Create(rows) | SelectReferences(K, (0, 1))
        assert_that(sets["sets"] | beam.MapTuple(lambda key, refs: (key[2], tuple(
            r.image_id for r in refs))), equal_to(list(draws.items())))


def test_anomalous_reference_becomes_an_error_and_is_never_drawn(test_pipeline):
    rows = [mrow("good0"), mrow("good1"), mrow("bad", label=1)]
    with test_pipeline() as p:
        out = p | beam.Create(rows) | SelectReferences(K, (0, 1))
        assert_that(out["sets"] | beam.MapTuple(lambda key, refs: (key, sorted(
            r.image_id for r in refs))),
            equal_to([(("ds", "cat", 0), ["good0", "good1"]),
                      (("ds", "cat", 1), ["good0", "good1"])]), label="Sets")
        assert_that(out[ERRORS] | beam.Map(lambda e: (e.image_id, e.role, e.stage,
                                                      "anomalous" in e.reason)),
                    equal_to([("bad", "reference", "select_references", True)]), label="Errors")


def test_distinct_references_once_per_image(test_pipeline):
    rows = [mrow(f"a{i}") for i in range(5)]
    expected = sorted({r.image_id for s in (0, 1, 2) for r in draw_references(rows, s, K)})
    with test_pipeline() as p:
        sets = (p | beam.Create(rows) | SelectReferences(K, (0, 1, 2)))["sets"]
        assert_that(distinct_references(sets) | beam.Map(lambda r: r.image_id),
                    equal_to(expected))


def test_assembled_sets_follow_draw_order_and_skip_unloaded(test_pipeline):
    """A set names its references by id and content hash (their features stay in the
    feature cache), in draw order; a reference that failed to load is left out."""
    rows = [mrow(f"a{i}") for i in range(5)]
    drawn = draw_references(rows, 0, K)
    missing = drawn[1].image_id  # failed to load: no features
    loaded = [r for r in rows if r.image_id != missing]
    expected_ids = tuple(r.image_id for r in drawn if r.image_id != missing)

    def check(kv):
        key, payload = kv
        return (key, payload.image_ids, payload.selected, payload.hashes_for("clip"))

    with test_pipeline() as p:
        sets = (p | "Rows" >> beam.Create(rows) | SelectReferences(K, (0,)))["sets"]
        hashes = p | "Hashes" >> beam.Create([(r, f"sha-{r.image_id}") for r in loaded])
        out = {"sets": sets, "hashes": hashes} | AssembleReferenceSets()
        assert_that(out | beam.Map(check), equal_to([(
            ("ds", "cat", 0), expected_ids, K, tuple(f"sha-{i}" for i in expected_ids))]))


def test_representative_selection_needs_the_cache_it_reads():
    from pipeline.model.scorers.suite import SuiteSpec

    with pytest.raises(ValueError, match="features_root"):
        AssembleReferenceSets(choose=(SuiteSpec(), K, None))
