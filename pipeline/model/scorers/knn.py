"""Nearest-neighbour distances in bounded memory, shared by the CNN scorers (pure torch).

Distances are Euclidean. The candidates are found with the matrix-product form
‖a‖² − 2a·b + ‖b‖² (one GEMM per chunk instead of ``torch.cdist``, which materialises the
differences on some backends and is slower on the CPU); the winners' distances are then
recomputed directly as ‖a − b‖, because the product form loses about 1e-7·‖a‖² to
cancellation and would leave an identical patch at a distance of ~1e-3·‖a‖ instead of 0.
"""
from __future__ import annotations

import torch

# Bound each (rows, columns) block of squared distances to about this many elements.
DEFAULT_CHUNK = 1 << 22


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_j‖² by the matrix-product form, clamped at 0.

    a: (n, d), b: (m, d) → (n, m)
    """
    d2 = (a * a).sum(-1, keepdim=True) - 2.0 * (a @ b.T) + (b * b).sum(-1).unsqueeze(0)
    return d2.clamp_min_(0.0)


def chunked_knn(a: torch.Tensor, b: torch.Tensor, k: int = 1,
                chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of ``b`` for every row of ``a``, nearest first.

    a: (n, d) queries, b: (m, d) memory, 1 ≤ k ≤ m
    returns: distances (n, k) and indices into b (n, k)

    Blocks of at most about ``chunk`` squared distances are formed at a time (rows of a ×
    columns of b); a running top-k merges the column blocks, so the result does not depend
    on ``chunk``.
    """
    n, d = a.shape
    m = b.shape[0]
    if b.shape[1] != d:
        raise ValueError(f"queries have width {d}, memory {b.shape[1]}")
    if not 1 <= k <= m:
        raise ValueError(f"k must be in [1, {m}] (the memory size), got {k}")
    cols = min(m, max(k, chunk // 64))  # all of b at once unless b is huge
    rows = max(1, min(chunk // cols, chunk // (k * d)))
    out_d, out_i = [], []
    for r0 in range(0, n, rows):
        q = a[r0:r0 + rows]
        best_d = best_i = None
        for c0 in range(0, m, cols):
            d2 = squared_distances(q, b[c0:c0 + cols])
            kk = min(k, d2.shape[1])
            vals, idx = d2.topk(kk, dim=1, largest=False)
            idx = idx + c0
            if best_d is not None:
                vals, pick = torch.cat([best_d, vals], 1).topk(k, dim=1, largest=False)
                idx = torch.cat([best_i, idx], 1).gather(1, pick)
            best_d, best_i = vals, idx
        # exact distances of the winners: (rows, k, d) differences, in row blocks
        exact = (q.unsqueeze(1) - b[best_i]).norm(dim=-1)
        exact, order = exact.sort(dim=1)
        out_d.append(exact)
        out_i.append(best_i.gather(1, order))
    if not out_d:
        return a.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=a.device)
    return torch.cat(out_d), torch.cat(out_i)


def chunked_min_distance(a: torch.Tensor, b: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """min_j ‖a_i − b_j‖ and its argmin.

    a: (n, d), b: (m, d) → distances (n,), indices into b (n,)
    """
    dist, idx = chunked_knn(a, b, 1, chunk)
    return dist[:, 0], idx[:, 0]


def grouped_min_distance(a: torch.Tensor, groups: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The nearest-neighbour distance of every row of ``a`` within each group separately.

    a: (n, d), groups: (g, m, d) (e.g. the patches of g reference images)
    returns: (n, g) with [i, j] = min_p ‖a_i − groups[j, p]‖

    The winners are chosen on the same squared distances as ``squared_distances`` gives,
    value for value, so the result is bit-identical to it (and to any ``chunk``); but the
    norms are computed once per call and each block of rows is formed in place in one
    reused buffer of about ``chunk`` elements: SPADE's finest level makes 3,136 × 25,088
    distances per image at k = 8, and a fresh tensor for every step of every block cost as
    much as the products. Blocks smaller than ``chunk`` were slower with 2 threads on a
    loaded CPU (more parallel regions; bench/RESULTS.md, "SPADE's cost").
    """
    n, d = a.shape
    g, m, gd = groups.shape
    if gd != d:
        raise ValueError(f"queries have width {d}, groups {gd}")
    if m == 0:
        raise ValueError("every group needs at least one row")
    if n == 0 or g == 0:
        return a.new_zeros((n, g))
    flat = groups.reshape(g * m, d)
    a_sq = (a * a).sum(-1, keepdim=True)  # (n, 1)
    b_sq = (flat * flat).sum(-1)  # (g·m,)
    rows = max(1, min(n, chunk // (g * m), chunk // (g * d)))
    buffer = a.new_empty((rows, g * m))
    out = a.new_empty((n, g))
    pick = torch.arange(g, device=a.device).unsqueeze(0)  # (1, g)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        q, d2 = a[r0:r1], buffer[:r1 - r0]
        # a_sq − 2·a·bᵀ + b_sq, clamped: the values and order of ``squared_distances``
        torch.addmm(a_sq[r0:r1], q, flat.T, beta=1.0, alpha=-2.0, out=d2)
        d2.add_(b_sq).clamp_min_(0.0)
        idx = d2.view(r1 - r0, g, m).argmin(dim=2)  # (rows, g)
        out[r0:r1] = (q.unsqueeze(1) - groups[pick, idx]).norm(dim=-1)
    return out
