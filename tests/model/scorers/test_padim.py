"""PaDiM: Ledoit–Wolf against scikit-learn; the Mahalanobis map and image score against a
per-position loop from the paper's equations with the covariance of its reference
implementations (xiahaifeng1995/PaDiM-Anomaly-Detection-Localization main.py and anomalib's
MultiVariateGaussian: ``np.cov(x, rowvar=False) + 0.01·I``, i.e. normalised by k − 1) and with
scikit-learn's Ledoit–Wolf; the few-shot edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.covariance import LedoitWolf

from pipeline.model.maps import gaussian_blur
from pipeline.model.scorers.padim import Padim, ledoit_wolf, paper_features
from tests.model.scorers.loops import nearest_loop


def _features(k: int, seed: int, c4: int = 3, c8: int = 4, grid: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"s4": torch.randn(k, c4, grid, grid, generator=gen),
            "s8": torch.randn(k, c8, grid // 2, grid // 2, generator=gen)}


@pytest.mark.parametrize("k", [3, 5, 12])
def test_ledoit_wolf_equals_sklearn(k):
    x = torch.randn(4, k, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    lw = ledoit_wolf(x)
    cov = lw.covariance()
    for p in range(4):
        ref = LedoitWolf().fit(x[p].numpy())
        assert lw.rho[p].item() == pytest.approx(ref.shrinkage_, abs=1e-12)
        assert np.allclose(cov[p].numpy(), ref.covariance_, atol=1e-12)
        assert np.allclose(lw.mean[p].numpy(), ref.location_)


def test_ledoit_wolf_with_one_and_two_samples():
    x1 = torch.randn(3, 1, 5, dtype=torch.float64)
    lw = ledoit_wolf(x1)  # one sample: S = 0, target 0
    assert torch.equal(lw.rho, torch.zeros(3)) and torch.equal(lw.mu, torch.zeros(3))
    assert torch.equal(lw.covariance(), torch.zeros(3, 5, 5, dtype=torch.float64))
    x2 = torch.randn(3, 2, 5, dtype=torch.float64)
    lw2 = ledoit_wolf(x2)  # two samples: both outer products equal S, no shrinkage
    assert torch.allclose(lw2.rho, torch.zeros(3, dtype=torch.float64))
    for p in range(3):
        assert LedoitWolf().fit(x2[p].numpy()).shrinkage_ == pytest.approx(0.0, abs=1e-12)


def _padim_loop(padim: Padim, refs: dict, queries: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Map and image score, one position at a time: numpy's unbiased covariance (k ≥ 2; at
    k = 1 the references give NaN and ours is 0) or sklearn's Ledoit–Wolf, plus 0.01·I."""
    def embed(feats, i):  # (C, h, w): the s8 map nearest-upsampled to s4's grid
        fine = feats["s4"][i].double()
        return torch.cat([fine, nearest_loop(feats["s8"][i].double(), fine.shape[1:])])

    k, b = refs["s4"].shape[0], queries["s4"].shape[0]
    total = refs["s4"].shape[1] + refs["s8"].shape[1]
    keep = padim.channel_subset(total, torch.device("cpu"))
    ref_emb = torch.stack([embed(refs, i) for i in range(k)])[:, keep]  # (k, d, h, w)
    q_emb = torch.stack([embed(queries, i) for i in range(b)])[:, keep]
    _, d, h, w = ref_emb.shape
    dist = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            samples = ref_emb[:, :, i, j].numpy()
            if padim.covariance == "ledoit-wolf":
                cov = LedoitWolf().fit(samples).covariance_
            else:
                cov = np.cov(samples, rowvar=False) if k > 1 else np.zeros((d, d))
            inv = np.linalg.inv(cov + padim.epsilon * np.eye(d))
            for n in range(b):
                r = q_emb[n, :, i, j].numpy() - samples.mean(0)
                dist[n, i, j] = float(np.sqrt(r @ inv @ r))
    full = F.interpolate(dist[:, None], size=(h * 4, w * 4), mode="bilinear",
                         align_corners=False)[:, 0]
    score = torch.tensor([gaussian_filter(m.numpy(), padim.sigma).max() for m in full])
    return dist, score


@pytest.mark.filterwarnings("ignore:Only one sample available")
@pytest.mark.parametrize("covariance", ["sample", "ledoit-wolf"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_map_and_score_equal_the_loop(k, covariance):
    padim = Padim(strides=(4, 8), n_features=5, seed=3, sigma=1.5, covariance=covariance)
    refs, queries = _features(k, 0), _features(3, 1)
    out = padim.score(queries, padim.build_memory(refs))
    dist, score = _padim_loop(padim, refs, queries)
    assert out.patch_map.shape == (3, 4, 4) and out.score.shape == (3,)
    assert torch.allclose(out.patch_map.double(), dist, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.score.double(), score, rtol=1e-4)
    assert torch.allclose(out.components["map_max"], out.patch_map.flatten(1).amax(1))


def test_one_reference_is_euclidean_over_sqrt_epsilon():
    padim = Padim(strides=(4, 8), n_features=100)
    refs, queries = _features(1, 0), _features(2, 1)
    got = padim.distance_map(queries, padim.build_memory(refs))
    emb = lambda f: torch.cat([f["s4"], F.interpolate(f["s8"], scale_factor=2.0)], 1)  # noqa: E731
    want = (emb(queries) - emb(refs)).norm(dim=1) / padim.epsilon**0.5
    assert torch.allclose(got, want, rtol=1e-5)


def test_the_mean_scores_zero_and_a_perturbed_position_peaks():
    padim = Padim(strides=(4, 8), n_features=100)
    refs = _features(4, 0, grid=8)
    memory = padim.build_memory(refs)
    # the references' mean (per map; nearest upsampling commutes with the mean)
    mean = {key: v.mean(0, keepdim=True) for key, v in refs.items()}
    assert torch.allclose(padim.score(mean, memory).patch_map, torch.zeros(1, 8, 8), atol=1e-3)
    single = Padim(strides=(4, 8))
    one = {key: v[:1] for key, v in refs.items()}
    out = single.score(one, single.build_memory(one))
    assert out.score.item() == 0.0 and out.patch_map.abs().max().item() == 0.0
    # a reference with one s4 position changed: the map peaks there, the score rises
    bad = {key: v[1:2].clone() for key, v in refs.items()}
    bad["s4"][0, :, 5, 2] += 4.0
    clean_out, bad_out = padim.score({k_: v[1:2] for k_, v in refs.items()}, memory), \
        padim.score(bad, memory)
    assert divmod(int(bad_out.patch_map[0].argmax()), 8) == (5, 2)
    # the σ = 4 px blur spreads one position (4×4 px) of the map, so the rise is diluted
    assert bad_out.score.item() > 1.4 * clean_out.score.item()
    assert bad_out.components["map_max"].item() > 5 * clean_out.components["map_max"].item()


def test_channel_subset_is_seeded_sorted_and_capped():
    padim = Padim(n_features=5, seed=7)
    a, b = padim.channel_subset(20, torch.device("cpu")), padim.channel_subset(20, "cpu")
    assert torch.equal(a, b) and a.tolist() == sorted(a.tolist()) and len(set(a.tolist())) == 5
    assert not torch.equal(a, Padim(n_features=5, seed=8).channel_subset(20, "cpu"))
    assert Padim(n_features=550).channel_subset(7, "cpu").tolist() == list(range(7))


def test_paper_features_per_backbone():
    assert paper_features("resnet18") == 100 and paper_features("wide_resnet50_2") == 550
    assert paper_features("mobilenet_v2") == 550  # not in the paper: WRN-50's d, capped


def test_gaussian_blur_equals_scipy():
    x = torch.rand(2, 13, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.7, 4.0):  # 4σ beyond the map's size: mirrored more than once
        want = np.stack([gaussian_filter(m.numpy(), sigma) for m in x])
        assert np.allclose(gaussian_blur(x, sigma).numpy(), want, atol=1e-12)


def test_edge_cases():
    padim = Padim(strides=(4, 8))
    with pytest.raises(ValueError, match="at least 1"):
        padim.build_memory({key: v[:0] for key, v in _features(1, 0).items()})
    memory = padim.build_memory(_features(2, 0))
    empty = padim.score({key: v[:0] for key, v in _features(1, 1).items()}, memory)
    assert empty.score.shape == (0,) and empty.patch_map.shape == (0, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        padim.score(_features(1, 1, grid=8), memory)
    with pytest.raises(ValueError):
        Padim(epsilon=0)
    with pytest.raises(ValueError, match="covariance"):
        Padim(covariance="diagonal")
