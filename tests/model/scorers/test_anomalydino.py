"""AnomalyDINO: nearest-neighbour cosine distance, top-1 % mean and PCA masking against plain
loops from the paper's equations; identical and perturbed queries; k = 0 is refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model.scorers.anomalydino import (CATEGORY, PATCHES, ROTATED, AnomalyDinoScorer,
                                                foreground_mask, nearest_cosine_distance,
                                                top_fraction_mean)


def cos_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def top_mean_loop(values, fraction=0.01):
    """The official mean_top1p: ⌊fraction · n⌋ largest values, or the maximum if that is 0."""
    count = int(len(values) * fraction)
    ordered = sorted(values, reverse=True)
    return ordered[0] if count == 0 else sum(ordered[:count]) / count


def anomalydino_loop(query, refs, fraction):
    """query: (h, w, c), refs: (k, h', w', c) → (score, (h, w) distances), one patch at a time."""
    bank = [p for ref in refs.tolist() for row in ref for p in row]
    dist = [[min(cos_distance(p, r) for r in bank) for p in row] for row in query.tolist()]
    return top_mean_loop([d for row in dist for d in row], fraction), dist


def feats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 22])
def test_nearest_cosine_distance_equals_a_loop_for_every_chunk(chunk):
    q, bank = F.normalize(feats(13, 4), dim=-1), F.normalize(feats(9, 4, seed=1), dim=-1)
    got = nearest_cosine_distance(q, bank, chunk)
    want = torch.tensor([min(cos_distance(a, b) for b in bank.tolist()) for a in q.tolist()])
    assert torch.allclose(got, want.float(), atol=1e-6)


def test_nearest_cosine_distance_edge_cases():
    bank = F.normalize(feats(3, 4), dim=-1)
    assert nearest_cosine_distance(bank[:0], bank).shape == (0,)
    assert nearest_cosine_distance(bank, bank).abs().max() < 1e-6
    with pytest.raises(ValueError, match="empty"):
        nearest_cosine_distance(bank, bank[:0])
    with pytest.raises(ValueError, match="width"):
        nearest_cosine_distance(bank, feats(3, 5))


@pytest.mark.parametrize("n, fraction", [(50, 0.01), (250, 0.01), (1024, 0.01), (7, 0.5),
                                         (10, 1.0)])
def test_top_fraction_mean_equals_the_official_definition(n, fraction):
    d = feats(3, n).abs()
    got = top_fraction_mean(d, fraction)
    want = torch.tensor([top_mean_loop(row, fraction) for row in d.tolist()])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("fraction", [0.01, 0.2])
def test_scorer_equals_the_loop(fraction):
    refs, queries = feats(2, 3, 4, 5, seed=1), feats(3, 3, 4, 5, seed=2)
    scorer = AnomalyDinoScorer(top_fraction=fraction, chunk=5)
    out = scorer.score({PATCHES: queries}, scorer.build_memory({PATCHES: refs}))
    assert out.score.shape == (3,) and out.patch_map.shape == (3, 3, 4)
    for b in range(3):
        score, dist = anomalydino_loop(queries[b], refs, fraction)
        assert out.score[b].item() == pytest.approx(score, abs=1e-6)
        assert torch.allclose(out.patch_map[b], torch.tensor(dist).float(), atol=1e-6)
        assert out.components["max_patch"][b].item() == pytest.approx(max(map(max, dist)),
                                                                      abs=1e-6)


def test_a_reference_scores_zero_and_a_perturbed_region_peaks():
    refs = feats(2, 6, 6, 8, seed=3)
    scorer = AnomalyDinoScorer()
    memory = scorer.build_memory({PATCHES: refs})
    same = scorer.score({PATCHES: refs * 3.0}, memory)  # cosine: the scale does not matter
    assert same.score.abs().max() < 1e-6 and same.patch_map.abs().max() < 1e-6
    bad = refs[:1].clone()
    bad[0, 1:3, 3:5] = feats(2, 2, 8, seed=4)
    out = scorer.score({PATCHES: bad}, memory)
    peak = divmod(int(out.patch_map[0].argmax()), 6)
    assert 1 <= peak[0] < 3 and 3 <= peak[1] < 5
    assert out.patch_map[0, 1:3, 3:5].min() > 0.05
    assert out.patch_map[0].flatten()[[0, 1, 2, 30, 35]].abs().max() < 1e-6
    assert out.score.item() > 0.05


@pytest.mark.parametrize("references", [{}, {PATCHES: torch.zeros(0, 3, 3, 4)}])
def test_zero_shot_is_refused_clearly(references):
    scorer = AnomalyDinoScorer()
    assert scorer.min_k == 1 and scorer.name == "anomalydino"
    with pytest.raises(ValueError, match=r"k ≥ 1.*no zero-shot"):
        scorer.build_memory(references)


def test_bad_options_and_features_are_refused():
    with pytest.raises(ValueError):
        AnomalyDinoScorer(top_fraction=0.0)
    with pytest.raises(ValueError, match="mask_references needs masking"):
        AnomalyDinoScorer(masking="off", mask_references=True)
    with pytest.raises(ValueError, match="masking must be one of"):
        AnomalyDinoScorer(masking="sometimes")
    with pytest.raises(ValueError, match=r"\(batch, h, w, c\)"):
        AnomalyDinoScorer().build_memory({PATCHES: torch.zeros(1, 9, 4)})


# ------------------------------------------------------------------ background masking


def mask_loop(patches, threshold, border=0.2, kernel=3, center_fraction=0.35):
    """AnomalyDINO's compute_background_mask for one (h, w, c) image, written out: PCA by
    numpy SVD (largest-magnitude score positive), threshold, adaptive flip on the centre
    crop, dilation, then closing (outside the grid: background for dilation, object for
    erosion, as OpenCV's defaults)."""
    h, w, c = patches.shape
    x = patches.reshape(h * w, c).double().numpy()
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    pc = u[:, 0] * s[0]
    pc = pc * (1 if pc[np.abs(pc).argmax()] >= 0 else -1)
    pc = pc.reshape(h, w)
    mask = pc > threshold
    center = mask[int(h * border):int(h * (1 - border)), int(w * border):int(w * (1 - border))]
    if center.sum() <= center.size * center_fraction:
        mask = -pc > threshold
    r = kernel // 2

    def morph(m, op, outside):
        out = np.zeros_like(m)
        for i in range(h):
            for j in range(w):
                vals = [m[a, b] if 0 <= a < h and 0 <= b < w else outside
                        for a in range(i - r, i + r + 1) for b in range(j - r, j + r + 1)]
                out[i, j] = op(vals)
        return out

    mask = morph(mask, any, False)  # dilate
    mask = morph(mask, any, False)  # close: dilate ...
    return morph(mask, all, True)  # ... then erode


# Chosen so that the masks are neither empty nor full and the flip goes both ways.
@pytest.mark.parametrize("threshold, seed, kernel", [(0.5, 0, 1), (0.0, 3, 1), (2.0, 1, 3),
                                                     (2.5, 2, 3)])
def test_foreground_mask_equals_the_loop(threshold, seed, kernel):
    patches = feats(3, 7, 8, 6, seed=seed)
    got = foreground_mask(patches, threshold=threshold, kernel=kernel)
    assert 0 < int(got.sum()) < got.numel()
    for b in range(3):
        want = mask_loop(patches[b], threshold, kernel=kernel)
        assert got[b].numpy().tolist() == want.tolist()


def test_foreground_mask_finds_a_centred_object_either_sign():
    g = torch.Generator().manual_seed(5)
    for sign in (1.0, -1.0):
        x = 0.1 * torch.randn(1, 10, 10, 16, generator=g)
        x[0, 3:7, 3:7, 0] += sign * 40.0  # the object: far along one direction
        mask = foreground_mask(x, threshold=10.0)[0]
        assert mask[3:7, 3:7].all()  # kept (and slightly enlarged by the dilation)
        assert not mask[:2].any() and not mask[:, :2].any() and not mask[8:].any()


def test_masking_zeroes_background_query_patches():
    x = 0.1 * torch.randn(2, 10, 10, 16, generator=torch.Generator().manual_seed(6))
    x[:, 3:7, 3:7, 0] += 40.0
    refs, queries = x[:1], x[1:].clone()
    queries[0, 0, 0] = torch.randn(16)  # an anomaly in the background is ignored
    plain = AnomalyDinoScorer().score({PATCHES: queries},
                                      AnomalyDinoScorer().build_memory({PATCHES: refs}))
    scorer = AnomalyDinoScorer(masking="on", mask_references=True)
    memory = scorer.build_memory({PATCHES: refs})
    assert memory.bank.shape[0] == int(foreground_mask(refs).sum()) < 100
    masked = scorer.score({PATCHES: queries}, memory)
    assert plain.patch_map[0, 0, 0] > 0.1 and masked.patch_map[0, 0, 0] == 0
    keep = foreground_mask(queries)[0]
    assert (masked.patch_map[0][~keep] == 0).all()


def test_auto_masking_follows_the_official_categories():
    """dammsi/AnomalyDINO's default ``agnostic`` preprocessing masks MVTec AD's capsule,
    hazelnut, pill, screw and toothbrush and every VisA category, no other."""
    x = 0.1 * torch.randn(2, 10, 10, 16, generator=torch.Generator().manual_seed(6))
    x[:, 3:7, 3:7, 0] += 40.0
    refs, queries = x[:1], x[1:].clone()
    queries[0, 0, 0] = torch.randn(16)  # a background anomaly
    scorer = AnomalyDinoScorer()
    for category, masked in (("screw", True), ("pcb3", True), ("Capsule", True),
                             ("bottle", False), ("carpet", False), (None, False)):
        memory = scorer.build_memory({PATCHES: refs}, {CATEGORY: category})
        out = scorer.score({PATCHES: queries}, memory)
        assert memory.masked is masked, category
        assert bool(out.patch_map[0, 0, 0] == 0) is masked, category
    assert AnomalyDinoScorer(masking="on").build_memory({PATCHES: refs}).masked
    assert not AnomalyDinoScorer(masking="off").build_memory(
        {PATCHES: refs}, {CATEGORY: "screw"}).masked


def test_rotated_references_join_the_memory():
    refs = feats(2, 3, 4, 5, seed=1)
    turned = feats(2 * 7, 3, 4, 5, seed=2).view(2, 7, 3, 4, 5)
    scorer = AnomalyDinoScorer()
    memory = scorer.build_memory({PATCHES: refs, ROTATED: turned})
    assert memory.bank.shape == (2 * 8 * 12, 5) and memory.k == 2
    # a query that is one rotated copy scores 0, as it does not without the rotations
    query = {PATCHES: turned[1, 4:5]}
    assert scorer.score(query, memory).score.item() == pytest.approx(0.0, abs=1e-6)
    plain = scorer.build_memory({PATCHES: refs})
    assert scorer.score(query, plain).score.item() > 0.05
