"""PatchCore: patch features, the greedy coreset and the reweighted score against plain loops
from the paper's equations; identical and perturbed queries."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.scorers.patchcore import PatchCore, greedy_coreset, random_projection
from tests.model.scorers.loops import (adaptive_avg_loop, bilinear_loop, nearest_distance_loop,
                                       neighbourhood_mean_loop)


def _features(k: int, seed: int, grid: int = 4, c8: int = 5, c16: int = 7) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"s8": torch.randn(k, c8, grid, grid, generator=gen),
            "s16": torch.randn(k, c16, grid // 2, grid // 2, generator=gen)}


def _embed_loop(pc: PatchCore, feats: dict, i: int) -> torch.Tensor:
    """(h, w, D): 3×3 means, s16 upsampled to s8, each pooled to pretrain_dim, then target_dim."""
    fine = neighbourhood_mean_loop(feats["s8"][i])
    coarse = bilinear_loop(neighbourhood_mean_loop(feats["s16"][i]), fine.shape[1:])
    _, h, w = fine.shape
    out = torch.zeros(h, w, pc.target_dim)
    for a in range(h):
        for b in range(w):
            joined = torch.cat([adaptive_avg_loop(fine[:, a, b], pc.pretrain_dim),
                                adaptive_avg_loop(coarse[:, a, b], pc.pretrain_dim)])
            out[a, b] = adaptive_avg_loop(joined, pc.target_dim)
    return out


def _score_loop(pc: PatchCore, bank: torch.Tensor, emb: torch.Tensor) -> tuple[float, list]:
    """Eq. 7 for one query, one patch at a time."""
    patches = emb.reshape(-1, emb.shape[-1])
    nearest = [nearest_distance_loop(p, bank) for p in patches]
    top = max(range(len(nearest)), key=lambda i: nearest[i][0])
    s_star, m_star = nearest[top][0], bank[nearest[top][1]]
    around = sorted(range(bank.shape[0]), key=lambda j: float((m_star - bank[j]).norm()))
    support = around[:min(pc.neighbours, bank.shape[0])]
    denom = sum(math.exp(float((patches[top] - bank[j]).norm())) for j in support)
    weight = 1 - math.exp(s_star) / denom
    return weight * s_star, [d for d, _ in nearest]


def test_patch_features_equal_the_loop():
    pc = PatchCore(pretrain_dim=6, target_dim=4)
    feats = _features(2, 0)
    got = pc.embed(feats)
    assert got.shape == (2, 4, 4, 4)
    for i in range(2):
        assert torch.allclose(got[i], _embed_loop(pc, feats, i), atol=1e-5)


def test_score_equals_the_loop():
    pc = PatchCore(pretrain_dim=6, target_dim=4, neighbours=3)
    refs, queries = _features(2, 0), _features(3, 1)
    memory = pc.build_memory(refs)
    bank = torch.cat([_embed_loop(pc, refs, i).reshape(-1, 4) for i in range(2)])
    assert torch.allclose(memory.bank, bank, atol=1e-5)
    out = pc.score(queries, memory)
    assert out.score.shape == (3,) and out.patch_map.shape == (3, 4, 4)
    for n in range(3):
        score, nearest = _score_loop(pc, bank, _embed_loop(pc, queries, n))
        assert out.score[n].item() == pytest.approx(score, rel=1e-4)
        assert torch.allclose(out.patch_map[n].flatten(), torch.tensor(nearest), atol=1e-4)
        assert out.components["max_patch"][n].item() == pytest.approx(max(nearest), rel=1e-5)
        assert 1 - 1 / 3 <= out.components["reweight"][n].item() < 1


def test_identical_query_scores_zero_and_a_perturbed_patch_peaks():
    pc = PatchCore(pretrain_dim=32, target_dim=16)
    refs = _features(3, 0, grid=8)
    memory = pc.build_memory(refs)
    same = pc.score({k: v[1:2] for k, v in refs.items()}, memory)
    assert same.score.item() == 0.0 and same.patch_map.abs().max().item() == 0.0
    bad = {k: v[1:2].clone() for k, v in refs.items()}
    bad["s8"][0, :, 2, 5] += 5.0
    out = pc.score(bad, memory)
    # the 3×3 aggregation spreads the change over the neighbourhood, and no further
    row, col = divmod(int(out.patch_map[0].argmax()), 8)
    assert abs(row - 2) <= 1 and abs(col - 5) <= 1
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[1:4, 4:7] = False
    assert out.patch_map[0][outside].abs().max().item() == 0.0
    assert out.patch_map[0][2, 5].item() > 0.5 and out.score.item() > 0.5


def _coreset_loop(z: torch.Tensor, n: int, start: int) -> list[int]:
    chosen = [start]
    while len(chosen) < n:
        def gap(i):
            return min(float((z[i] - z[c]).norm()) for c in chosen)
        chosen.append(max(range(z.shape[0]), key=gap))
    return chosen


def test_greedy_coreset_equals_the_loop():
    z = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    assert greedy_coreset(z, 7, start=5).tolist() == _coreset_loop(z, 7, 5)


def test_coreset_memory_is_a_seeded_subset():
    refs = _features(2, 0, grid=8)
    full = PatchCore(pretrain_dim=200, target_dim=150).build_memory(refs).bank  # 128 × 150
    pc = PatchCore(pretrain_dim=200, target_dim=150, coreset_ratio=0.25, seed=1)
    sub = pc.build_memory(refs).bank
    assert sub.shape == (32, 150)
    assert all((full == row).all(1).any() for row in sub)
    assert torch.equal(sub, pc.build_memory(refs).bank)
    # the projection keeps 128 of the 150 dimensions and is seeded
    proj = random_projection(full, 128, seed=1)
    assert proj.shape == (128, 128) and torch.equal(proj, random_projection(full, 128, seed=1))


def test_edge_cases():
    pc = PatchCore(pretrain_dim=6, target_dim=4)
    with pytest.raises(ValueError, match="at least 1"):
        pc.build_memory({k: v[:0] for k, v in _features(1, 0).items()})
    memory = pc.build_memory(_features(1, 0))
    empty = pc.score({k: v[:0] for k, v in _features(1, 1).items()}, memory)
    assert empty.score.shape == (0,) and empty.patch_map.shape == (0, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        pc.score(_features(1, 1, grid=8), memory)
    # a one-patch bank: no neighbourhood to reweight against, weight 1
    tiny = PatchCore(pretrain_dim=6, target_dim=4, coreset_ratio=1 / 16)
    out = tiny.score(_features(2, 1), tiny.build_memory(_features(1, 0)))
    assert torch.equal(out.components["reweight"], torch.ones(2))
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCore(coreset_ratio=0.0)
