"""The decode ceiling: images/s of LoadImages' per-image work (read, decode, preprocess, hash)."""
from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from pipeline.core.images import ImageLoadError, load_pixels

_preprocess: Callable | None = None


def load_one(path: str, preprocess: Callable) -> torch.Tensor:
    """Exactly what ``LoadImages`` does for one row, minus Beam: bytes → pixels (3, H, W)."""
    return load_pixels(path, preprocess)[0]


def _init_worker(preprocess: Callable) -> None:
    global _preprocess
    torch.set_num_threads(1)  # one core per process; ToTensor/Normalize are tiny ops
    _preprocess = preprocess


def _load_in_worker(path: str) -> int:
    try:
        load_one(path, _preprocess)
        return 1
    except ImageLoadError:
        return 0


def _ready(_: int) -> int:
    return 1


def decode_rate_threads(paths: Sequence[str], preprocess: Callable, threads: int) -> float:
    """Images/s over ``paths`` on ``threads`` threads of this process, as ``LoadImages``
    decodes with ``--decode-threads`` (thread start-up excluded)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: load_one(p, preprocess), paths[:threads]))
        start = time.perf_counter()
        done = sum(1 for _ in pool.map(lambda p: load_one(p, preprocess), paths))
        seconds = time.perf_counter() - start
    return done / seconds


def decode_rate(paths: Sequence[str], preprocess: Callable, processes: int) -> float:
    """Images/s over ``paths`` with ``processes`` worker processes (1: in this process).

    Worker start-up is excluded: the pool is started and answers before the clock starts.
    """
    if processes <= 1:
        start = time.perf_counter()
        for path in paths:
            load_one(path, preprocess)
        return len(paths) / (time.perf_counter() - start)
    ctx = mp.get_context("spawn")  # safe after CUDA is initialised, unlike fork
    with ctx.Pool(processes, initializer=_init_worker, initargs=(preprocess,)) as pool:
        pool.map(_ready, range(processes * 4), chunksize=1)
        start = time.perf_counter()
        done = sum(pool.imap_unordered(_load_in_worker, paths, chunksize=8))
        seconds = time.perf_counter() - start
    if done != len(paths):
        raise RuntimeError(f"only {done} of {len(paths)} images decoded")
    return len(paths) / seconds
