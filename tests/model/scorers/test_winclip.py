"""WinCLIP / WinCLIP+: the math against plain loops from the paper's equations, the window
extractor on the tiny random CLIP (token selection, shapes from the config), the prompts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.scorers.base import batch_size
from pipeline.model.scorers.winclip import (
    IMAGE, PATCHES, TEXT, WinClipExtractor, WinClipScorer, WindowLayout, few_shot_map,
    harmonic_aggregation, window_indices, window_key, winclip_text_features)
from pipeline.model.prompts import state_prompts

TAU = 0.07


# ------------------------------------------------------------------ plain loops


def windows_of(grid, scale):
    """(top, left) of every stride-1 window inside the grid, row-major."""
    return [(t, l) for t in range(grid[0] - scale[0] + 1) for l in range(grid[1] - scale[1] + 1)]


def covers(window, scale, r, c):
    t, l = window
    return t <= r < t + scale[0] and l <= c < l + scale[1]


def harmonic_loop(scores, grid, scale):
    """scores: list over windows → grid of harmonic means of the covering windows."""
    wins = windows_of(grid, scale)
    out = [[0.0] * grid[1] for _ in range(grid[0])]
    for r in range(grid[0]):
        for c in range(grid[1]):
            inv = [1.0 / scores[j] for j, w in enumerate(wins) if covers(w, scale, r, c)]
            out[r][c] = len(inv) / sum(inv) if inv else 0.0
    return out


def p_anomalous(f, text):
    """WinCLIP Eq. 1 for one embedding."""
    f = F.normalize(f.double(), dim=0)
    t = F.normalize(text.double(), dim=1)
    en, ea = math.exp(float(f @ t[0]) / TAU), math.exp(float(f @ t[1]) / TAU)
    return ea / (en + ea)


def min_half_distance(f, bank):
    f = F.normalize(f.double(), dim=0)
    return min(0.5 * (1.0 - float(f @ F.normalize(r.double(), dim=0))) for r in bank)


def winclip_loop(query, refs, text, grid, scales, patch_memory=True):
    """One query image (features without batch) → (score, map as nested lists, zs, fs)."""
    zs_image = p_anomalous(query[IMAGE], text)
    per_scale_zs = []
    for s in scales:
        scores = [p_anomalous(w, text) for w in query[window_key(s)]]
        per_scale_zs.append(harmonic_loop(scores, grid, s))
    zs = [[(len(scales) + 1) / (1 / zs_image + sum(1 / m[r][c] for m in per_scale_zs))
           for c in range(grid[1])] for r in range(grid[0])]
    if refs is None:
        return zs_image, zs, zs_image, None
    maps = []
    if patch_memory:
        bank = [p for ref in refs for p in ref[PATCHES]]
        flat = [min_half_distance(p, bank) for p in query[PATCHES]]
        maps.append([[flat[r * grid[1] + c] for c in range(grid[1])] for r in range(grid[0])])
    for s in scales:
        bank = [w for ref in refs for w in ref[window_key(s)]]
        scores = [max(min_half_distance(w, bank), 1e-12) for w in query[window_key(s)]]
        maps.append(harmonic_loop(scores, grid, s))
    fs = [[sum(m[r][c] for m in maps) / len(maps) for c in range(grid[1])]
          for r in range(grid[0])]
    fs_max = max(max(row) for row in fs)
    amap = [[0.5 * (zs[r][c] + fs[r][c]) for c in range(grid[1])] for r in range(grid[0])]
    return 0.5 * (zs_image + fs_max), amap, zs_image, fs_max


def as64(nested) -> torch.Tensor:
    return torch.tensor(nested, dtype=torch.float64)


def random_features(batch, layout, dim=6, width=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {IMAGE: F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
           PATCHES: F.normalize(torch.randn(batch, layout.num_patches, width, generator=g), dim=-1)}
    for s in layout.scales:
        n = len(windows_of(layout.grid, s))
        out[window_key(s)] = F.normalize(torch.randn(batch, n, dim, generator=g), dim=-1)
    return out


@pytest.fixture
def layout():
    return WindowLayout((4, 5), ((2, 2), (3, 2)))


@pytest.fixture
def text():
    return F.normalize(torch.randn(2, 6, generator=torch.Generator().manual_seed(9)), dim=-1)


# ------------------------------------------------------------------ windows and aggregation


@pytest.mark.parametrize("grid, scale", [((4, 5), (2, 2)), ((4, 5), (3, 2)), ((3, 3), (3, 3)),
                                         ((2, 6), (1, 4))])
def test_window_indices_are_the_patches_of_each_window_row_major(grid, scale):
    got = window_indices(grid, scale)
    want = [[(t + dy) * grid[1] + l + dx for dy in range(scale[0]) for dx in range(scale[1])]
            for t, l in windows_of(grid, scale)]
    assert got.tolist() == want


def test_a_window_larger_than_the_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        WindowLayout((4, 4), (5,))
    with pytest.raises(ValueError, match="repeat"):
        WindowLayout((4, 4), (2, (2, 2)))


def test_harmonic_aggregation_hand_example():
    # 3x3 grid, four 2x2 windows: the centre patch sees all four, a corner only one.
    lay = WindowLayout((3, 3), (2,))
    got = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), lay.coverage((2, 2)))
    want = torch.tensor([[1.0, 6 / 7, 0.75, 2 / 3, 4 / (1 + 4 / 3 + 2 + 4), 0.375,
                          0.5, 1 / 3, 0.25]])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("scale", [(2, 2), (3, 2), (1, 1)])
def test_harmonic_aggregation_equals_a_loop_over_covering_windows(layout, scale):
    n = len(windows_of(layout.grid, scale))
    scores = torch.rand(3, n, generator=torch.Generator().manual_seed(1)) + 0.01
    got = harmonic_aggregation(scores, WindowLayout(layout.grid, (scale,)).coverage(scale))
    for b in range(3):
        want = torch.tensor(harmonic_loop(scores[b].tolist(), layout.grid, scale)).flatten()
        assert torch.allclose(got[b], want.float(), atol=1e-6)


def test_harmonic_aggregation_of_an_exact_match_is_zero_not_nan():
    lay = WindowLayout((3, 3), (2,))
    got = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), lay.coverage((2, 2)))
    assert torch.isfinite(got).all() and got[0, 0] < 1e-10 and got[0, 2] == pytest.approx(0.5)


# ------------------------------------------------------------------ the scorer


def test_zero_shot_equals_the_loop(layout, text):
    q = random_features(3, layout)
    scorer = WinClipScorer(layout, temperature=TAU)
    memory = scorer.build_memory({}, {TEXT: text})
    out = scorer.score(q, memory)
    assert out.score.shape == (3,) and out.patch_map.shape == (3, *layout.grid)
    assert set(out.components) == {"zero_shot"}
    for b in range(3):
        score, amap, zs, _ = winclip_loop({k: v[b] for k, v in q.items()}, None, text,
                                          layout.grid, layout.scales)
        assert out.score[b].item() == pytest.approx(score, rel=1e-5)
        assert torch.allclose(out.patch_map[b].double(), as64(amap), rtol=1e-5)


def test_zero_shot_accepts_an_empty_reference_batch(layout, text):
    empty = {k: v[:0] for k, v in random_features(1, layout).items()}
    scorer = WinClipScorer(layout)
    assert scorer.min_k == 0 and scorer.name == "winclip"
    memory = scorer.build_memory(empty, {TEXT: text})
    assert memory.k == 0
    assert batch_size(scorer.score(random_features(2, layout), memory).components) == 2


@pytest.mark.parametrize("patch_memory", [True, False])
def test_few_shot_equals_the_loop(layout, text, patch_memory):
    q, refs = random_features(3, layout, seed=1), random_features(2, layout, seed=2)
    scorer = WinClipScorer(layout, temperature=TAU, patch_memory=patch_memory, chunk=7)
    out = scorer.score(q, scorer.build_memory(refs, {TEXT: text}))
    ref_list = [{k: v[i] for k, v in refs.items()} for i in range(2)]
    for b in range(3):
        score, amap, zs, fs = winclip_loop({k: v[b] for k, v in q.items()}, ref_list, text,
                                           layout.grid, layout.scales, patch_memory)
        assert out.score[b].item() == pytest.approx(score, rel=1e-5)
        assert out.components["zero_shot"][b].item() == pytest.approx(zs, rel=1e-5)
        assert out.components["few_shot"][b].item() == pytest.approx(fs, rel=1e-4, abs=1e-6)
        assert torch.allclose(out.patch_map[b].double(), as64(amap), rtol=1e-4, atol=1e-6)


def test_a_reference_scores_zero_few_shot_and_a_perturbed_region_peaks(layout, text):
    refs = random_features(2, layout, seed=3)
    scorer = WinClipScorer(layout)
    memory = scorer.build_memory(refs, {TEXT: text})
    same = {k: v[1:] for k, v in refs.items()}
    assert scorer.score(same, memory).components["few_shot"].item() < 1e-6
    assert few_shot_map(same, memory, layout).abs().max() < 1e-6

    # Replace patch (2, 3) and every window covering it with features far from all references.
    bad = {k: v.clone() for k, v in same.items()}
    r, c = 2, 3
    bad[PATCHES][0, r * layout.grid[1] + c] = -same[PATCHES][0, r * layout.grid[1] + c]
    for s in layout.scales:
        for j, w in enumerate(windows_of(layout.grid, s)):
            if covers(w, s, r, c):
                bad[window_key(s)][0, j] = -same[window_key(s)][0, j]
    fs = few_shot_map(bad, memory, layout)[0]
    assert divmod(int(fs.argmax()), layout.grid[1]) == (r, c)
    assert scorer.score(bad, memory).components["few_shot"] > 0.05


def test_memory_needs_text_of_the_right_shape(layout, text):
    scorer = WinClipScorer(layout)
    with pytest.raises(ValueError, match="context"):
        scorer.build_memory({})
    with pytest.raises(ValueError, match=r"\(2, embed_dim\)"):
        scorer.build_memory({}, {TEXT: text[:1]})


def test_features_of_another_layout_are_refused(layout, text):
    scorer = WinClipScorer(layout)
    memory = scorer.build_memory({}, {TEXT: text})
    other = random_features(1, WindowLayout(layout.grid, ((2, 2),)))
    with pytest.raises(KeyError, match="windows_3x2"):
        scorer.score(other, memory)


# ------------------------------------------------------------------ the CLIP side


@pytest.fixture(scope="module")
def extractor(tiny):
    return WinClipExtractor(tiny, scales=(2, 3), window_batch=50)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_window_features_have_the_shapes_of_the_config(tiny, extractor, pixels):
    geo = tiny.geometry
    gh, gw = geo.grid
    feats = extractor.extract(pixels)
    assert extractor.layout.grid == geo.grid == (geo.image_size[0] // geo.patch_size[0],
                                                 geo.image_size[1] // geo.patch_size[1])
    assert feats[IMAGE].shape == (2, geo.embed_dim)
    assert feats[PATCHES].shape == (2, geo.num_patches, geo.token_width)
    for s in (2, 3):
        assert feats[window_key((s, s))].shape == (2, (gh - s + 1) * (gw - s + 1), geo.embed_dim)
    assert all(torch.allclose(v.norm(dim=-1), torch.ones(())) for v in feats.values())
    assert "windows=2x2,3x3" in extractor.identity and tiny.spec.backbone_id in extractor.identity


def test_the_whole_grid_window_is_the_image_embedding(tiny, pixels):
    whole = WinClipExtractor(tiny, scales=(tiny.geometry.grid,)).extract(pixels)
    reference = F.normalize(tiny.encode_images(pixels).embeds, dim=-1)
    assert torch.allclose(whole[IMAGE], reference, atol=1e-5)
    assert torch.allclose(whole[window_key(tiny.geometry.grid)][:, 0], reference, atol=1e-5)


def test_patch_features_are_the_final_block_tokens(tiny, extractor, pixels):
    out = tiny.model.visual.forward_intermediates(
        pixels, indices=[tiny.geometry.depth - 1], output_fmt="NLC", normalize_intermediates=True)
    want = F.normalize(out["image_intermediates"][0], dim=-1)
    assert torch.allclose(extractor.extract(pixels)[PATCHES], want, atol=1e-5)


def test_a_window_sees_only_its_own_patches(tiny, extractor, pixels):
    p = tiny.geometry.patch_size[0]
    key, gw = window_key((2, 2)), tiny.geometry.grid[1]
    base = extractor.extract(pixels[:1])[key][0]
    outside = pixels[:1].clone()
    outside[..., 4 * p:, :] += 1.0  # patch rows 4.. change: windows with top ≤ 2 do not see them
    moved = extractor.extract(outside)[key][0]
    top = torch.arange(base.shape[0]) // (gw - 1)
    assert torch.allclose(moved[top <= 2], base[top <= 2], atol=1e-5)
    assert (moved[top >= 3] - base[top >= 3]).abs().amax(dim=-1).min() > 1e-4


def test_tiny_clip_end_to_end_identical_and_perturbed(tiny, extractor, pixels):
    text = F.normalize(torch.randn(2, tiny.geometry.embed_dim), dim=-1)  # few-shot needs none
    scorer = WinClipScorer(extractor.layout)
    refs = extractor.extract(pixels)
    memory = scorer.build_memory(refs, {TEXT: text})
    assert scorer.score({k: v[:1] for k, v in refs.items()}, memory).components["few_shot"] < 1e-5
    p = tiny.geometry.patch_size[0]
    bad = pixels[:1].clone()
    bad[..., 2 * p:4 * p, 5 * p:7 * p] = 3.0  # patches rows 2-3, cols 5-6
    fs = few_shot_map(extractor.extract(bad), memory, extractor.layout)[0]
    r, c = divmod(int(fs.argmax()), tiny.geometry.grid[1])
    assert 1 <= r <= 4 and 4 <= c <= 7  # the region or a patch next to it
    assert fs[2:4, 5:7].mean() > 3 * fs[:, :3].mean()


def test_text_features_average_winclips_compositional_ensemble(tiny):
    """WinCLIP's ensemble, written out from the paper, is InCTRL's state-prompt set."""
    normal_states = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw",
                     "{} without defect", "{} without damage")
    anomalous_states = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
    normal, anomalous = state_prompts("metal_nut")
    assert len(normal) == len(set(normal)) == 7 * 22 and len(anomalous) == 4 * 22
    assert {t for t in normal if "flawless metal nut" in t} and all(
        any(s.format("metal nut") in p for p in normal) for s in normal_states)
    assert all(any(s.format("metal nut") in p for p in anomalous) for s in anomalous_states)
    assert "a photo of a damaged metal nut for anomaly detection." in anomalous
    got = winclip_text_features(tiny, "metal_nut")
    want = torch.stack([F.normalize(tiny.encode_texts(side).mean(0), dim=0)
                        for side in (normal, anomalous)])
    assert got.shape == (2, tiny.geometry.embed_dim)
    assert torch.allclose(got, want, atol=1e-5)
