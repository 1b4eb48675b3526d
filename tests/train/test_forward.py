"""The training forward equals the scoring forward wherever both apply."""
from __future__ import annotations

import copy

import torch

from pipeline.model.backbone import ImageFeatures
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLModel
from pipeline.train.forward import forward_episodes, prepare_episode_references
from tests.model.helpers import geometry


def _features(n: int, geo, g: torch.Generator) -> ImageFeatures:
    return ImageFeatures(
        tokens=torch.randn(n, geo.num_layers, geo.num_patches, geo.token_width, generator=g),
        embeds=torch.randn(n, geo.embed_dim, generator=g),
    )


def _setup(seed: int = 0):
    geo = geometry()
    g = torch.Generator().manual_seed(seed)
    scorer = InCTRLModel(geo, InCTRLHeads.seeded(geo.embed_dim, geo.num_patches, seed))
    text = torch.nn.functional.normalize(torch.randn(2, geo.embed_dim, generator=g), dim=-1)
    return geo, g, scorer, text


def test_shared_references_give_the_scoring_forward_in_train_and_eval_mode():
    geo, g, scorer, text = _setup()
    queries, refs = _features(6, geo, g), _features(3, geo, g)
    for train in (True, False):
        a, b = copy.deepcopy(scorer).train(train), copy.deepcopy(scorer).train(train)
        expected = a(queries, a.prepare_references(refs), text)
        prepared = prepare_episode_references(b, [refs] * len(queries))
        got = forward_episodes(b, queries, prepared, text.expand(len(queries), -1, -1))
        for name in ("final", "fine", "holistic", "image_residual"):
            assert torch.allclose(getattr(got, name), getattr(expected, name), atol=1e-6), name


def test_each_query_is_scored_against_its_own_references():
    geo, g, scorer, text = _setup(1)
    scorer.eval()
    queries = _features(4, geo, g)
    refs = [_features(k, geo, g) for k in (1, 2, 3, 4)]
    texts = torch.stack([text, text.flip(0), text, text.flip(0)])
    got = forward_episodes(scorer, queries, prepare_episode_references(scorer, refs), texts)
    for i in range(4):
        alone = scorer(queries[i], scorer.prepare_references(refs[i]), texts[i])
        assert torch.allclose(got.final[i], alone.final[0], atol=1e-6)
        assert torch.allclose(got.image_residual[i], alone.image_residual[0], atol=1e-6)


def test_a_query_identical_to_its_reference_has_zero_fine_score():
    geo, g, scorer, text = _setup(2)
    scorer.eval()
    queries = _features(2, geo, g)
    refs = [queries[0], queries[1]]
    got = forward_episodes(scorer, queries, prepare_episode_references(scorer, refs),
                           text.expand(2, -1, -1))
    assert torch.allclose(got.fine, torch.zeros(2), atol=1e-6)


def test_gradients_reach_every_trainable_parameter():
    geo, g, scorer, text = _setup(3)
    scorer.train()
    queries = _features(4, geo, g)
    refs = [_features(2, geo, g) for _ in range(4)]
    out = forward_episodes(scorer, queries, prepare_episode_references(scorer, refs),
                           text.expand(4, -1, -1))
    (out.holistic_logits.sum() + out.image_logits.sum()).backward()
    missing = [n for n, p in scorer.heads.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
