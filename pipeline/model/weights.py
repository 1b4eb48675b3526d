"""What every model loader shares: the ``random[:SEED]`` weights spelling, seeded creation,
and the checksum of a weights file."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from typing import Iterator

import fsspec
import torch

#: ``random`` or ``random:SEED``: seeded random weights (tests, benchmarks).
RANDOM_PREFIX = "random"


def is_random(weights: str) -> bool:
    return weights == RANDOM_PREFIX or weights.startswith(RANDOM_PREFIX + ":")


def random_seed(weights: str) -> int:
    """The seed of ``random[:SEED]`` (0 when none is given); ValueError for a bad seed."""
    _, _, seed = weights.partition(":")
    try:
        return int(seed) if seed else 0
    except ValueError:
        raise ValueError(f"random weights take an integer seed, got {weights!r}") from None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator seeded inside, restored after (model creation draws from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file at a local path or fsspec URL, read in blocks."""
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def weights_label(weights: str) -> str:
    """A weights setting as rows record it: a file as ``name#sha256=<12 hex>`` (not its
    host's path), anything else (a tag, ``random:SEED``) as given."""
    if os.path.isfile(weights):
        return f"{os.path.basename(weights)}#sha256={file_sha256(weights)[:12]}"
    return weights
