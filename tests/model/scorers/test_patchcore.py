"""PatchCore against plain loops written from the paper (Roth et al. 2022, Sec. 3.1: each
feature map locally smoothed over the 3×3 neighbourhood, pooled to a predefined
dimensionality, the deeper level bilinearly upsampled and both aggregated) and from the
authors' code
(amazon-science/patchcore-inspection, src/patchcore/patchcore.py and common.py): an
``Unfold(3, stride 1, padding 1)`` of each layer (zero outside the map), each patch
flattened as (C, 3, 3) and ``adaptive_avg_pool1d``-ed to ``pretrain_embed_dimension``, the
coarser layer's unfolded maps bilinearly resized to the finer grid *before* that pooling,
the layers stacked and pooled to ``target_embed_dimension``; the score a patch's squared L2
distance to its nearest bank patch (FAISS ``IndexFlatL2``), the image score the plain max.
The loops follow that order (unfold → resize → pool), not ours (pool → resize)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.scorers.patchcore import (PatchCore, greedy_coreset, patch_vectors,
                                              random_projection)
from tests.model.scorers.loops import adaptive_avg_loop, bilinear_loop, nearest_distance_loop


def _features(k: int, seed: int, grid: int = 4, c8: int = 5, c16: int = 7) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"s8": torch.randn(k, c8, grid, grid, generator=gen),
            "s16": torch.randn(k, c16, grid // 2, grid // 2, generator=gen)}


def _unfold_loop(x: torch.Tensor) -> torch.Tensor:
    """(C, h, w) → (C·9, h, w): at each position the 3×3 patch, zero outside the map, in
    (c, ky, kx) order."""
    c, h, w = x.shape
    out = torch.zeros(c * 9, h, w)
    for a in range(h):
        for b in range(w):
            vec = []
            for ch in range(c):
                for ky in range(3):
                    for kx in range(3):
                        y, z = a + ky - 1, b + kx - 1
                        vec.append(float(x[ch, y, z]) if 0 <= y < h and 0 <= z < w else 0.0)
            out[:, a, b] = torch.tensor(vec)
    return out


def _embed_loop(pc: PatchCore, feats: dict, i: int) -> torch.Tensor:
    """(h, w, D) for image i, in the official order."""
    fine = _unfold_loop(feats["s8"][i])
    coarse = bilinear_loop(_unfold_loop(feats["s16"][i]), fine.shape[1:])
    _, h, w = fine.shape
    out = torch.zeros(h, w, pc.target_dim)
    for a in range(h):
        for b in range(w):
            joined = torch.cat([adaptive_avg_loop(fine[:, a, b], pc.pretrain_dim),
                                adaptive_avg_loop(coarse[:, a, b], pc.pretrain_dim)])
            out[a, b] = adaptive_avg_loop(joined, pc.target_dim)
    return out


def test_patch_features_equal_the_official_chain():
    pc = PatchCore(pretrain_dim=6, target_dim=4, aggregation="official")
    feats = _features(2, 0)
    got = pc.embed(feats)
    assert got.shape == (2, 4, 4, 4)
    for i in range(2):
        assert torch.allclose(got[i], _embed_loop(pc, feats, i), atol=1e-5)


def _smooth_loop(x: torch.Tensor) -> torch.Tensor:
    """(C, h, w): each channel's 3×3 neighbourhood summed and divided by 9 (the positions
    outside the map are the padding's zeros)."""
    c, h, w = x.shape
    out = torch.zeros_like(x)
    for a in range(h):
        for b in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= a + dy < h and 0 <= b + dx < w:
                        out[:, a, b] += x[:, a + dy, b + dx] / 9
    return out


def test_patch_features_equal_the_papers_local_smoothing():
    pc = PatchCore(pretrain_dim=6, target_dim=4)  # aggregation "mean", the default
    feats = _features(2, 0)
    got = pc.embed(feats)
    for i in range(2):
        fine = _smooth_loop(feats["s8"][i])
        coarse = bilinear_loop(_smooth_loop(feats["s16"][i]), fine.shape[1:])
        for a in range(4):
            for b in range(4):
                joined = torch.cat([adaptive_avg_loop(fine[:, a, b], 6),
                                    adaptive_avg_loop(coarse[:, a, b], 6)])
                assert torch.allclose(got[i, a, b], adaptive_avg_loop(joined, 4), atol=1e-5)
    # on a 1024-channel-like layer (C·9 = 9·dim) the official chain is the same smoothing
    wide = {"s8": torch.randn(1, 4, 5, 5), "s16": torch.randn(1, 4, 3, 3)}
    mean, official = PatchCore(pretrain_dim=4, target_dim=4), \
        PatchCore(pretrain_dim=4, target_dim=4, aggregation="official")
    assert torch.allclose(mean.embed(wide), official.embed(wide), atol=1e-6)


def test_narrow_layers_keep_the_neighbourhood_and_wide_ones_average_it():
    """Closed forms of the official pooling: C·9 = 9·dim gives the 3×3 mean with the zeros of
    the padding counted (WRN-50's layer3: 9216 → 1024); C·9 = 4.5·dim a 3×3 filter weighting
    the centre 0.2 and the rest 0.1 after the layer fusion's pairing (layer2: 4608 → 1024);
    C·9 < dim copies single patch values (MobileNetV2's 32 channels: 288 → 1024)."""
    x = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    mean = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    assert torch.allclose(patch_vectors(x, 4), mean, atol=1e-6)
    weights = torch.full((3, 3), 0.1)
    weights[1, 1] = 0.2
    pairs = patch_vectors(x[:, :2], 4).view(1, 2, 2, 5, 6).mean(2)  # the Aggregator's pairs
    centred = F.conv2d(x[:, :2], weights.expand(2, 1, 3, 3), padding=1, groups=2)
    assert torch.allclose(pairs, centred, atol=1e-6)
    corner = x[0, 0, :2, :2]  # at a corner only 4 real values: total weight 0.5, not 1
    assert centred[0, 0, 0, 0].item() == pytest.approx(
        float(0.2 * corner[0, 0] + 0.1 * (corner.sum() - corner[0, 0])), abs=1e-6)
    narrow = patch_vectors(x[:, :1], 18)  # 9 values → 18: each value exactly twice
    unfolded = _unfold_loop(x[0, :1])
    assert torch.allclose(narrow[0], unfolded.repeat_interleave(2, dim=0), atol=1e-6)


def test_concat_is_the_papers_concatenation_of_the_aggregated_levels():
    """``stage_dims="concat"``: the paper's locally aware features of each level (here the
    zero-padded 3×3 mean, or the official unfolded 3×3 patch) with the deeper level
    bilinearly rescaled to the finer grid and the two concatenated, no dimension pooling."""
    feats = _features(2, 0)  # 5 and 7 channels
    for aggregation, local in (("mean", _smooth_loop), ("official", _unfold_loop)):
        pc = PatchCore(pretrain_dim=6, target_dim=4, aggregation=aggregation,
                       stage_dims="concat")
        got = pc.embed(feats)
        for i in range(2):
            fine = local(feats["s8"][i])
            coarse = bilinear_loop(local(feats["s16"][i]), fine.shape[1:])
            want = torch.cat([fine, coarse]).permute(1, 2, 0)  # (h, w, C8 + C16)
            assert got[i].shape == want.shape
            assert torch.allclose(got[i], want, atol=1e-5)
    pc = PatchCore(stage_dims="concat")
    refs, queries = _features(2, 0), _features(3, 1)
    out = pc.score(queries, pc.build_memory(refs))
    bank = pc.embed(refs).reshape(-1, 12)
    for n in range(3):
        squared = [nearest_distance_loop(p, bank)[0] ** 2
                   for p in pc.embed(queries)[n].reshape(-1, 12)]
        assert out.score[n].item() == pytest.approx(max(squared), rel=1e-5)


def test_pooled_chain_gives_each_stage_the_same_share():
    """The official ``MeanMapper`` (each layer adaptive-average-pooled to 1024, whatever its
    width) and ``Aggregator`` (the stacked layers pooled to 1024), on a 2-channel and a
    6-channel stage pooled to 12 and 12: the fine channels are repeated 6 times and the
    coarse ones twice, the pairs then averaged, so each fine channel appears 3 times and each
    coarse one once: the squared distance weighs the stages 6 : 6, a fine channel 3 : 1
    (MobileNetV2's 32 and 96 channels, 1024 and 1024, give the same 3 : 1)."""
    feats = _features(2, 0, c8=2, c16=6)
    pooled = PatchCore(pretrain_dim=12, target_dim=12).embed(feats)
    plain = PatchCore(stage_dims="concat").embed(feats)  # (2, 4, 4, 8)
    repeated = torch.cat([plain[..., :2].repeat_interleave(3, dim=-1), plain[..., 2:]], -1)
    assert torch.allclose(pooled, repeated, atol=1e-6)
    # the default keeps the reference chain: the same as the explicit "pooled"
    assert torch.equal(PatchCore(pretrain_dim=12, target_dim=12, stage_dims="pooled")
                       .embed(feats), pooled)


@pytest.mark.parametrize("aggregation", ["mean", "official"])
def test_score_is_the_max_squared_nearest_distance(aggregation):
    pc = PatchCore(pretrain_dim=6, target_dim=4, aggregation=aggregation)
    refs, queries = _features(2, 0), _features(3, 1)
    memory = pc.build_memory(refs)
    bank = torch.cat([pc.embed(refs)[i].reshape(-1, 4) for i in range(2)])
    if aggregation == "official":
        bank = torch.cat([_embed_loop(pc, refs, i).reshape(-1, 4) for i in range(2)])
    assert torch.allclose(memory.bank, bank, atol=1e-5)
    out = pc.score(queries, memory)
    assert out.score.shape == (3,) and out.patch_map.shape == (3, 4, 4)
    for n in range(3):
        patches = pc.embed(queries)[n].reshape(-1, 4)
        squared = [nearest_distance_loop(p, bank)[0] ** 2 for p in patches]
        assert torch.allclose(out.patch_map[n].flatten(), torch.tensor(squared), atol=1e-4)
        assert out.score[n].item() == pytest.approx(max(squared), rel=1e-5)
    assert out.components == {}


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
    # a one-patch bank still scores
    tiny = PatchCore(pretrain_dim=6, target_dim=4, coreset_ratio=1 / 16)
    out = tiny.score(_features(2, 1), tiny.build_memory(_features(1, 0)))
    assert out.score.shape == (2,) and bool((out.score > 0).all())
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCore(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="aggregation"):
        PatchCore(aggregation="max")
    with pytest.raises(ValueError, match="stage_dims"):
        PatchCore(stage_dims="sum")
