"""ScoreQueries on its own: batches of query features against side-input reference sets and
prompts, scored by fake scorers (the real ones are tested in tests/model)."""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass

import apache_beam as beam
import pytest
import torch
from apache_beam.testing.util import assert_that, equal_to

import transforms.score as score_mod
from pipeline.core.config import ScoreConfig
from pipeline.core.feature_cache import FeatureCache
from pipeline.core.schemas import ERRORS
from pipeline.model.backbone import ImageFeatures, tiny_spec
from pipeline.model.inctrl import ReferenceSet, ScoreComponents
from pipeline.model.scorers.base import TRAINING_FREE, ScorerOutput
from pipeline.model.scorers.inctrl import InctrlScorer
from pipeline.model.scorers.suite import RunIdentity, TensorBundle
from tests.beamtest import counter, mrow
from transforms.cache import cache_identities
from transforms.references import ReferencePayload
from transforms.score import STAGE_SCORE, ScoreQueries

LAYERS, PATCHES, WIDTH, EMBED = 2, 4, 3, 5
MODEL_ID = "fake-model"
HEADS = "fake-heads"
#: What the launcher computes once per run: each scorer's model id and checkpoint hash.
IDENTITY = RunIdentity(model_ids=(("inctrl", MODEL_ID), ("patchcore", "fake-cnn-model")),
                       checkpoints=(("inctrl", HEADS), ("patchcore", None)))


def clip_bundle(tokens: torch.Tensor, embeds: torch.Tensor) -> TensorBundle:
    return TensorBundle.join({"clip": {"tokens": tokens, "embeds": embeds}})


class FakeScorer:
    """InCTRLModel's interface, with scores anyone can compute by hand.

    A query's fine score is its first embedding value plus the sum of its reference set's
    embeddings (so each seed's set gives other scores); the text prior is its embedding
    dotted with the anomalous prompt; the patch map is its first layer's first channel plus
    the same shift. Every call is logged.
    """

    has_heads = False

    def __init__(self) -> None:
        self.prepared: list[float] = []  # the shift of each set prepared
        self.batches: list[int] = []  # queries per call

    def prepare_references(self, refs: ImageFeatures) -> ReferenceSet:
        self.prepared.append(float(refs.embeds.sum()))
        return ReferenceSet(tokens_unit=refs.tokens, embeds=refs.embeds, adapted_mean=None,
                            k=len(refs))

    def __call__(self, queries: ImageFeatures, refs: ReferenceSet,
                 text: torch.Tensor) -> ScoreComponents:
        self.batches.append(len(queries))
        shift = refs.embeds.sum()
        fine = queries.embeds[:, 0] + shift
        nan = torch.full_like(fine, float("nan"))
        return ScoreComponents(final=fine, fine=fine, holistic=nan, image_residual=nan,
                               text_prior=queries.embeds @ text[1],
                               patch_map=queries.tokens[:, 0, :, 0] + shift)


class FakeCnnScorer:
    """A second scorer on another extractor's features (``cnn/x``): a query's score is its
    ``x`` value plus ten times its memory's reference count; memories are logged."""

    name = "patchcore"
    min_k = 1

    def __init__(self) -> None:
        self.memories: list[int] = []

    def build_memory(self, references, context=None):
        self.memories.append(references["x"].shape[0])
        return references["x"].shape[0]

    def score(self, queries, memory) -> ScorerOutput:
        score = queries["x"][:, 0] + 10.0 * memory
        return ScorerOutput(score=score, patch_map=queries["x"].view(-1, 1, 2))


@pytest.fixture
def fake(monkeypatch) -> FakeScorer:
    scorer = FakeScorer()
    monkeypatch.setattr(score_mod, "build_scorers", lambda suite: (
        {"inctrl": InctrlScorer(scorer, (2, 2))}))
    return scorer


@pytest.fixture
def fakes(monkeypatch) -> tuple[FakeScorer, FakeCnnScorer]:
    inctrl, cnn = FakeScorer(), FakeCnnScorer()
    monkeypatch.setattr(score_mod, "build_scorers", lambda suite: (
        {"inctrl": InctrlScorer(inctrl, (2, 2)), "patchcore": cnn}))
    return inctrl, cnn


def _config(**kw) -> ScoreConfig:
    base = dict(manifest="m", output="o", backbone=tiny_spec(), k=2, seeds=(0, 1),
                batch_size=2, run_id="run-1")
    base.update(kw)
    return ScoreConfig(**base)


def _query(image_id: str, category: str, value: float):
    """A query whose features are all ``value``: its fake fine score is ``value + shift``."""
    row = mrow(image_id, role="query", category=category, label=int(value) % 2)
    feats = clip_bundle(torch.full((1, LAYERS, PATCHES, WIDTH), value),
                        torch.full((1, EMBED), value))
    feats.tensors["cnn/x"] = torch.full((1, 2), 2 * value)
    return (row, f"sha-{image_id}"), feats


@dataclass
class RefSet:
    """A test's reference set: ids and features (``_score`` puts the features in a feature
    cache and gives ScoreQueries the ids and content hashes, as PrepareReferences does)."""

    image_ids: tuple[str, ...]
    features: TensorBundle
    selected: int


def _payload(category: str, seed: int, k: int = 2) -> RefSet:
    """Reference embeddings all equal to ``seed + 1``: the set's shift is k * EMBED * (seed + 1)."""
    ids = tuple(f"{category}-ref{seed}-{i}" for i in range(k))
    features = clip_bundle(torch.zeros(k, LAYERS, PATCHES, WIDTH),
                           torch.full((k, EMBED), float(seed + 1)))
    features.tensors["cnn/x"] = torch.zeros(k, 2)
    return RefSet(image_ids=ids, selected=k, features=features)


def _shift(payload: RefSet) -> float:
    return float(payload.features["clip/embeds"].sum())


def _cached(ref_sets: dict, config: ScoreConfig, root: str) -> dict[tuple, ReferencePayload]:
    """Each set's features into the feature cache at ``root`` (one entry per image and
    extractor the run reads, keyed by a content hash), and its payload naming them."""
    caches = {ext: FeatureCache(root, identity)
              for ext, identity in cache_identities(config.suite, references=True).items()}
    out = {}
    for key, ref_set in ref_sets.items():
        content = {}
        for i, image_id in enumerate(ref_set.image_ids):
            sha = hashlib.sha256(f"{key}/{image_id}".encode()).hexdigest()
            for ext, cache in caches.items():
                cache.put(sha, {n: v[i:i + 1] for n, v in ref_set.features.part(ext).items()})
            content[image_id] = sha
        out[key] = ReferencePayload(ref_set.image_ids, ref_set.selected, content=content)
    return out


PROMPT_WEIGHT = {"a": 1.0, "b": 2.0, "c": 3.0}


def _prompt(category: str) -> torch.Tensor:
    """(2, EMBED): a query's fake text prior is its value times the category's weight."""
    text = torch.zeros(2, EMBED)
    text[1, 0] = PROMPT_WEIGHT[category]
    return text


def _score(config, queries, ref_sets, categories=("a", "b", "c"), test_pipeline=None,
           check=None, cache_root=None, before_run=None):
    """Run ScoreQueries; ``check(outputs, p)`` adds assertions; returns the result."""
    with tempfile.TemporaryDirectory() as tmp:
        root = cache_root or tmp
        p = test_pipeline()
        payloads = _cached(ref_sets, config, root)
        refs = p | "Refs" >> beam.Create(list(payloads.items()))
        prompts = p | "Prompts" >> beam.Create([(c, _prompt(c)) for c in categories])
        out = (p | "Queries" >> beam.Create(queries)
               | ScoreQueries(config, IDENTITY, refs, prompts, root))
        check(out)
        if before_run is not None:
            before_run(root, payloads)
        result = p.run()
        result.wait_until_finish()
        return result


def _scored(rec: dict) -> tuple:
    return (rec["image_id"], rec["category"], rec["seed"], rec["final_score"], rec["fine_score"],
            rec["holistic_score"], rec["image_residual_score"], rec["text_prior_score"],
            rec["k"], rec["k_used"], tuple(rec["reference_ids"]), rec["scoring_mode"],
            rec["model_id"], rec["heads_hash"], rec["run_id"], rec["label"], "role" in rec)


def _expected_score(image_id, category, value, seed, payload, config) -> tuple:
    fine = value + _shift(payload)
    prior = value * PROMPT_WEIGHT[category]
    return (image_id, category, seed, fine, fine, None, None, prior, config.k,
            len(payload.image_ids), payload.image_ids, TRAINING_FREE, MODEL_ID, HEADS,
            config.run_id, int(value) % 2, False)


def test_scores_are_the_scorers_per_seed(fake, test_pipeline):
    config = _config()
    values = {"a": [0.0, 1.0, 2.0], "b": [10.0, 11.0]}
    queries = [_query(f"{c}{i}", c, v) for c, vs in values.items() for i, v in enumerate(vs)]
    ref_sets = {("ds", c, s): _payload(c, s, k=1 + s) for c in values for s in config.seeds}
    expected = [_expected_score(f"{c}{i}", c, v, s, ref_sets[("ds", c, s)], config)
                for c, vs in values.items() for i, v in enumerate(vs) for s in config.seeds]
    assert len({e[3] for e in expected}) == len(expected)  # every score tells its inputs apart

    def check(out):
        assert_that(out["scores"] | beam.Map(_scored), equal_to(expected), label="Scores")
        assert_that(out[ERRORS], equal_to([]), label="NoErrors")

    result = _score(config, queries, ref_sets, test_pipeline=test_pipeline, check=check)
    assert counter(result, "queries_scored") == len(expected)
    assert counter(result, "queries_failed") == 0


def test_a_group_without_references_gives_one_error_per_seed(fake, test_pipeline):
    config = _config(seeds=(0, 1, 2))
    queries = [_query("a0", "a", 1.0), _query("a1", "a", 2.0),  # no reference set at all
               _query("b0", "b", 3.0),  # references for every seed
               _query("c0", "c", 4.0)]  # references for seed 1 only
    ref_sets = {("ds", "b", s): _payload("b", s) for s in config.seeds}
    ref_sets[("ds", "c", 1)] = _payload("c", 1)
    # Another dataset's set of the same category is not "a"'s.
    ref_sets[("other", "a", 0)] = _payload("a", 0)
    failed = [("a0", 0), ("a0", 1), ("a0", 2), ("a1", 0), ("a1", 1), ("a1", 2),
              ("c0", 0), ("c0", 2)]
    scored = [("b0", 0), ("b0", 1), ("b0", 2), ("c0", 1)]

    def error_key(rec):
        assert "no usable normal reference image" in rec["reason"], rec["reason"]
        assert f"category {rec['category']!r}" in rec["reason"]
        return (rec["image_id"], rec["seed"], rec["stage"], rec["role"], rec["run_id"],
                rec["model_id"])

    def check(out):
        assert_that(out[ERRORS] | beam.Map(error_key),
                    equal_to([(i, s, STAGE_SCORE, "query", "run-1", MODEL_ID) for i, s in failed]),
                    label="Errors")
        assert_that(out["scores"] | beam.Map(lambda r: (r["image_id"], r["seed"])),
                    equal_to(scored), label="Scored")

    result = _score(config, queries, ref_sets, test_pipeline=test_pipeline, check=check)
    assert counter(result, "queries_failed") == len(failed)
    assert counter(result, "queries_scored") == len(scored)
    assert sum(fake.batches) == len(scored)  # nothing was scored for a missing set


@pytest.mark.parametrize("write_patch_map", [True, False])
def test_patch_map_is_written_only_when_asked(fake, test_pipeline, write_patch_map):
    config = _config(seeds=(0,), write_patch_map=write_patch_map)
    values = {"a0": 1.0, "a1": 2.5, "a2": -3.0}
    queries = [_query(i, "a", v) for i, v in values.items()]
    ref_sets = {("ds", "a", 0): _payload("a", 0)}
    shift = _shift(ref_sets[("ds", "a", 0)])

    def maps(rec):
        return rec["image_id"], rec.get("patch_map", "absent")

    expected = [(i, [v + shift] * PATCHES if write_patch_map else "absent")
                for i, v in values.items()]

    def check(out):
        assert_that(out["scores"] | beam.Map(maps), equal_to(expected))

    _score(config, queries, ref_sets, test_pipeline=test_pipeline, check=check)


def test_each_reference_set_is_prepared_once_for_many_batches(fake, test_pipeline):
    config = _config(seeds=(0, 1), batch_size=2)
    queries = [_query(f"a{i}", "a", float(i)) for i in range(6)]
    queries += [_query(f"b{i}", "b", float(i)) for i in range(4)]
    ref_sets = {("ds", c, s): _payload(c, s) for c in "ab" for s in config.seeds}
    ref_sets[("ds", "c", 0)] = _payload("c", 0)  # no query uses it: never prepared

    result = _score(config, queries, ref_sets, test_pipeline=test_pipeline,
                    check=lambda out: None)

    assert sum(fake.batches) == len(queries) * len(config.seeds)
    assert max(fake.batches) <= config.batch_size
    assert len(fake.batches) >= 10  # at least 5 batches per seed...
    assert counter(result, "reference_sets_prepared") == 4  # ...but one preparation per set
    assert sorted(fake.prepared) == sorted(_shift(ref_sets[("ds", c, s)])
                                           for c in "ab" for s in config.seeds)


def test_nan_components_become_nulls_and_finite_ones_stay():
    assert score_mod._nan_to_none(float("nan")) is None
    assert score_mod._nan_to_none(0.25) == 0.25
    assert score_mod._nan_to_none(-math.inf) == -math.inf


def test_every_scorer_scores_every_query_once_per_seed(fakes, test_pipeline):
    inctrl, cnn = fakes
    config = _config(scorers=("inctrl", "patchcore"), seeds=(0, 1), write_patch_map=True)
    values = {"a0": 1.0, "a1": 2.0, "b0": 5.0}
    queries = [_query(i, i[0], v) for i, v in values.items()]
    ref_sets = {("ds", c, s): _payload(c, s, k=1 + s) for c in "ab" for s in config.seeds}
    ref_sets.pop(("ds", "b", 1))  # b has no set for seed 1: one error per scorer

    def key(rec):
        return rec["image_id"], rec["seed"], rec["scorer"]

    expected_cnn = [(i, s, "patchcore", 2 * v + 10.0 * (1 + s), [2 * v, 2 * v], 1, 2,
                     None, "wide_resnet50_2", None)
                    for i, v in values.items() for s in config.seeds if (i[0], s) != ("b", 1)]

    def check(out):
        scores = out["scores"]
        assert_that(scores | "Keys" >> beam.Map(key), equal_to(
            [(i, s, n) for i in values for s in config.seeds for n in ("inctrl", "patchcore")
             if (i[0], s) != ("b", 1)]), label="OneRowEach")
        assert_that(
            scores | "Cnn" >> beam.Filter(lambda r: r["scorer"] == "patchcore")
            | "CnnCols" >> beam.Map(lambda r: (
                r["image_id"], r["seed"], r["scorer"], r["final_score"], r["patch_map"],
                r["patch_map_height"], r["patch_map_width"], r.get("fine_score"), r["backbone"],
                r["heads_hash"])),
            equal_to(expected_cnn), label="CnnRows")
        assert_that(out[ERRORS] | "ErrKeys" >> beam.Map(key),
                    equal_to([("b0", 1, "inctrl"), ("b0", 1, "patchcore")]), label="Errors")

    result = _score(config, queries, ref_sets, test_pipeline=test_pipeline, check=check)
    # one memory per (group, seed, scorer) that a query used
    assert sorted(cnn.memories) == [1, 1, 2]
    assert counter(result, "reference_sets_prepared") == 6


def test_a_group_whose_reference_features_left_the_cache_fails_alone(fake, test_pipeline):
    """The features are read from the cache where the group is scored: an entry gone (a
    cache emptied under a running job) fails that group's rows of that seed, nothing else."""
    config = _config(seeds=(0, 1))
    queries = [_query("a0", "a", 1.0), _query("b0", "b", 2.0)]
    ref_sets = {("ds", c, s): _payload(c, s) for c in "ab" for s in config.seeds}

    def drop_one(root, payloads):
        cache = FeatureCache(root, cache_identities(config.suite, references=True)["clip"])
        sha = payloads[("ds", "a", 1)].hashes_for("clip")[0]
        os.remove(f"{cache.root}/{sha[:2]}/{sha}.safetensors")

    def check(out):
        assert_that(out["scores"] | beam.Map(lambda r: (r["image_id"], r["seed"])),
                    equal_to([("a0", 0), ("b0", 0), ("b0", 1)]), label="Scored")
        assert_that(out[ERRORS] | beam.Map(lambda r: (
            r["image_id"], r["seed"], r["stage"], r["reason"].split(":")[0])),
            equal_to([("a0", 1, STAGE_SCORE, "MissingFeatures")]), label="Errors")

    _score(config, queries, ref_sets, test_pipeline=test_pipeline, check=check,
           before_run=drop_one)
