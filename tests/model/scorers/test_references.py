"""Representative references: k-medoids in a scorer's descriptor space."""
from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.model.scorers.references import (choose_representative, cosine_distances,
                                               descriptors, k_medoids)


def _cost(dist: torch.Tensor, medoids) -> float:
    return float(dist[list(medoids)].min(dim=0).values.sum())


def _points(seed: int = 0, n: int = 12, d: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64),
                                         dim=-1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_no_single_swap_improves_and_build_is_near_the_optimum(seed, k):
    dist = cosine_distances(_points(seed))
    chosen = k_medoids(dist, k).tolist()
    cost = _cost(dist, chosen)
    n = dist.shape[0]
    for slot, c in itertools.product(range(k), range(n)):  # plain loops: a local optimum
        if c in chosen:
            continue
        swapped = chosen[:slot] + [c] + chosen[slot + 1:]
        assert _cost(dist, swapped) >= cost - 1e-9
    best = min(_cost(dist, m) for m in itertools.combinations(range(n), k))
    assert cost <= best * 1.05 + 1e-12  # and close to the exhaustive optimum


def test_k_one_is_the_most_central_image():
    x = _points(3, n=9)
    dist = cosine_distances(x)
    central = min(range(9), key=lambda i: float(dist[i].sum()))
    assert k_medoids(dist, 1).tolist() == [central]


def test_a_far_cluster_gets_its_own_reference():
    g = torch.Generator().manual_seed(1)
    near = torch.tensor([1.0, 0, 0]) + 0.05 * torch.randn(10, 3, generator=g)
    far = torch.tensor([0, 1.0, 0]) + 0.05 * torch.randn(3, 3, generator=g)
    x = torch.nn.functional.normalize(torch.cat([near, far]).double(), dim=-1)
    chosen = k_medoids(cosine_distances(x), 2).tolist()
    assert any(i >= 10 for i in chosen) and any(i < 10 for i in chosen)


def test_k_at_least_the_pool_gives_the_whole_pool_in_order():
    dist = cosine_distances(_points(0, n=4))
    assert k_medoids(dist, 4).tolist() == [0, 1, 2, 3]
    assert k_medoids(dist, 9).tolist() == [0, 1, 2, 3]


def test_the_same_pool_gives_the_same_images_whatever_their_order():
    x = _points(4, n=15)
    ids = [f"img{i}" for i in range(15)]
    chosen = {ids[i] for i in choose_representative("clip", {"embeds": x}, 3).tolist()}
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(9))
    # the job puts every pool in its seeded draw order first; any fixed order gives the same
    # choice up to exact ties, and with distinct points there are none
    again = choose_representative("clip", {"embeds": x[perm]}, 3).tolist()
    assert {ids[int(perm[i])] for i in again} == chosen


def test_descriptors_of_each_extractor():
    n = 3
    feats = {
        "clip": {"embeds": torch.randn(n, 8), "tokens": torch.randn(n, 2, 4, 6)},
        "windows": {"image": torch.randn(n, 8)},
        "cnn": {"s8": torch.randn(n, 4, 6, 6), "s16": torch.randn(n, 5, 3, 3)},
        "dino": {"patches": torch.randn(n, 2, 2, 7)},
    }
    assert descriptors("cnn", feats["cnn"]).shape == (n, 5)  # the deepest map, pooled
    assert torch.allclose(descriptors("dino", feats["dino"]),
                          torch.nn.functional.normalize(feats["dino"]["patches"].mean((1, 2)),
                                                        dim=-1))
    for ext, f in feats.items():
        assert torch.allclose(descriptors(ext, f).norm(dim=-1), torch.ones(n))
    with pytest.raises(ValueError):
        descriptors("nope", {})
