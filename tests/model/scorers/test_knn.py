"""The chunked nearest-neighbour helpers equal a brute-force loop, whatever the chunk."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.scorers.knn import (chunked_knn, chunked_min_distance, grouped_min_distance,
                                        squared_distances)
from tests.model.scorers.loops import nearest_distance_loop


def _brute_knn(a, b, k):
    rows_d, rows_i = [], []
    for i in range(a.shape[0]):
        dists = [(float(torch.sqrt(((a[i] - b[j]) ** 2).sum())), j) for j in range(b.shape[0])]
        dists.sort()
        rows_d.append([d for d, _ in dists[:k]])
        rows_i.append([j for _, j in dists[:k]])
    return torch.tensor(rows_d), torch.tensor(rows_i)


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])  # many row/column blocks … one block
@pytest.mark.parametrize("k", [1, 3])
def test_knn_equals_a_loop_for_any_chunk(chunk, k):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(13, 5, generator=gen), torch.randn(11, 5, generator=gen)
    dist, idx = chunked_knn(a, b, k, chunk)
    ref_d, ref_i = _brute_knn(a, b, k)
    assert dist.shape == idx.shape == (13, k)
    assert torch.allclose(dist, ref_d, atol=1e-5)
    assert torch.equal(idx, ref_i)


def test_min_distance_is_exactly_zero_for_a_row_of_the_memory():
    gen = torch.Generator().manual_seed(1)
    b = 30 * torch.randn(9, 64, generator=gen)  # large norms: the product form alone leaves ~1e-2
    dist, idx = chunked_min_distance(b[[4, 2]], b)
    assert torch.equal(dist, torch.zeros(2))
    assert idx.tolist() == [4, 2]
    d, i = nearest_distance_loop(b[0] + 0.5, b)
    got_d, got_i = chunked_min_distance((b[0] + 0.5)[None], b)
    assert got_i.item() == i and got_d.item() == pytest.approx(d, rel=1e-6)


@pytest.mark.parametrize("chunk", [5, 30, 1 << 22])  # a row per block, 1-row-of-21, all rows
def test_grouped_min_distance_equals_a_loop(chunk):
    gen = torch.Generator().manual_seed(2)
    a, groups = torch.randn(6, 4, generator=gen), torch.randn(3, 7, 4, generator=gen)
    got = grouped_min_distance(a, groups, chunk)
    want = torch.tensor([[nearest_distance_loop(a[i], groups[g])[0] for g in range(3)]
                         for i in range(6)])
    assert got.shape == (6, 3)
    assert torch.allclose(got, want, atol=1e-5)


def test_grouped_min_distance_does_not_depend_on_the_blocks():
    """Bit for bit: the in-place blocks choose on the values ``squared_distances`` gives."""
    gen = torch.Generator().manual_seed(3)
    a, groups = 10 * torch.randn(40, 24, generator=gen), 10 * torch.randn(5, 60, 24, generator=gen)
    whole = squared_distances(a, groups.reshape(-1, 24)).view(40, 5, 60).argmin(dim=2)
    want = (a.unsqueeze(1) - groups[torch.arange(5).unsqueeze(0), whole]).norm(dim=-1)
    for chunk in (1, 300, 301, 1 << 22):  # 1 row per block … every row in one block
        assert torch.equal(grouped_min_distance(a, groups, chunk), want)


def test_grouped_min_distance_is_exactly_zero_for_a_row_of_a_group():
    gen = torch.Generator().manual_seed(4)
    groups = 30 * torch.randn(2, 9, 64, generator=gen)  # large norms, as in chunked_min_distance
    got = grouped_min_distance(groups[1, [4, 7]], groups)
    assert torch.equal(got[:, 1], torch.zeros(2))
    assert (got[:, 0] > 0).all()


def test_edge_cases():
    b = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k must be"):
        chunked_knn(torch.randn(2, 3), b, 5)
    with pytest.raises(ValueError, match="width"):
        chunked_knn(torch.randn(2, 2), b)
    dist, idx = chunked_knn(torch.zeros(0, 3), b, 2)
    assert dist.shape == idx.shape == (0, 2)
    assert grouped_min_distance(torch.zeros(0, 3), b[None]).shape == (0, 1)
    assert grouped_min_distance(torch.zeros(2, 3), b[None][:0]).shape == (2, 0)
    with pytest.raises(ValueError, match="at least one row"):
        grouped_min_distance(torch.zeros(2, 3), b[None, :0])
    with pytest.raises(ValueError, match="width"):
        grouped_min_distance(torch.zeros(2, 2), b[None])
