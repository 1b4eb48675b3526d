"""SPADE: image kNN and pyramid-correspondence map against a plain loop from the paper's
equations; identical and perturbed queries; the gallery restricted to the K nearest."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.scorers.spade import Spade
from tests.model.scorers.loops import bilinear_loop, nearest_distance_loop

STRIDES = (4, 8, 16)


def _features(k: int, seed: int, grid: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    feats = {f"s{s}": torch.randn(k, 2 + s // 4, grid * 4 // s, grid * 4 // s, generator=gen)
             for s in STRIDES}
    feats["pooled"] = torch.randn(k, 6, generator=gen)
    return feats


def _spade_loop(spade: Spade, refs: dict, queries: dict):
    k, b = refs["pooled"].shape[0], queries["pooled"].shape[0]
    kk = min(spade.top_k, k)
    scores, maps = [], []
    for n in range(b):
        dists = sorted((float((queries["pooled"][n] - refs["pooled"][j]).norm()), j)
                       for j in range(k))
        scores.append(sum(d for d, _ in dists[:kk]) / kk)
        gallery = [j for _, j in dists[:kk]]
        levels = []
        for s in STRIDES:
            q = queries[f"s{s}"][n]
            _, h, w = q.shape
            pool = torch.cat([refs[f"s{s}"][j].reshape(q.shape[0], -1).T for j in gallery])
            level = torch.tensor([[nearest_distance_loop(q[:, i, jj], pool)[0] for jj in range(w)]
                                  for i in range(h)])
            levels.append(bilinear_loop(level[None], queries["s4"].shape[-2:])[0])
        maps.append(torch.stack(levels).mean(0))
    return torch.tensor(scores), torch.stack(maps)


@pytest.mark.parametrize("chunk", [97, 1 << 22])  # a row per block; every query row in one
@pytest.mark.parametrize("top_k", [50, 2])  # the paper's K (all references), and a gallery of 2
def test_score_and_map_equal_the_loop(top_k, chunk):
    spade = Spade(top_k=top_k, chunk=chunk)
    refs, queries = _features(4, 0), _features(3, 1)
    out = spade.score(queries, spade.build_memory(refs))
    score, maps = _spade_loop(spade, refs, queries)
    assert out.score.shape == (3,) and out.patch_map.shape == (3, 8, 8)
    assert torch.allclose(out.score, score, atol=1e-5)
    assert torch.allclose(out.patch_map, maps, atol=1e-5)
    assert torch.allclose(out.components["map_max"], maps.flatten(1).amax(1), atol=1e-5)


def test_identical_query_has_a_zero_map_and_the_least_score():
    spade = Spade()
    refs = _features(3, 0)
    memory = spade.build_memory(refs)
    out = spade.score(refs, memory)  # each reference against all three
    assert out.patch_map.abs().max().item() == 0.0
    single = {k: v[:1] for k, v in refs.items()}
    assert spade.score(single, spade.build_memory(single)).score.item() == 0.0
    # a reference with one stride-8 position changed: the map peaks over it, the score rises
    bad = {k: v[1:2].clone() for k, v in refs.items()}
    bad["s8"][0, :, 1, 2] += 6.0
    bad["pooled"][0] += 0.5
    hit = spade.score(bad, memory)
    row, col = divmod(int(hit.patch_map[0].argmax()), 8)
    assert row // 2 == 1 and col // 2 == 2  # the fine cells under the coarse position
    assert hit.score.item() > out.score[1].item()


def test_edge_cases():
    spade = Spade()
    with pytest.raises(ValueError, match="at least 1"):
        spade.build_memory({k: v[:0] for k, v in _features(1, 0).items()})
    memory = spade.build_memory(_features(2, 0))
    empty = spade.score({k: v[:0] for k, v in _features(1, 1).items()}, memory)
    assert empty.score.shape == (0,) and empty.patch_map.shape == (0, 8, 8)
    with pytest.raises(ValueError, match="grid"):
        spade.score(_features(1, 1, grid=16), memory)
    assert (Spade.min_k, Spade.uses_pooled, Spade().strides) == (1, True, STRIDES)
