"""One process-wide cache of loaded models, keyed by their hashable specs.

Heavy state is loaded once per worker process and shared by every DoFn instance and thread
in it: the role Beam's ``apache_beam.utils.shared.Shared`` plays in a pipeline, here without
importing Beam (this is the model layer). Each key has its own lock: the first thread to ask
loads it, the others asking for the same model wait for that one copy, and different models
load in parallel.
"""
from __future__ import annotations

import threading
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

_MODELS: dict[tuple[str, Hashable], object] = {}
_KEY_LOCKS: dict[tuple[str, Hashable], threading.Lock] = {}
_LOCK = threading.Lock()


def shared(kind: str, key: Hashable, load: Callable[[], T]) -> T:
    """The ``kind`` model for ``key`` in this process, loaded with ``load()`` on first use."""
    slot = (kind, key)
    with _LOCK:
        if slot in _MODELS:
            return _MODELS[slot]  # type: ignore[return-value]
        lock = _KEY_LOCKS.setdefault(slot, threading.Lock())
    with lock:
        with _LOCK:
            if slot in _MODELS:
                return _MODELS[slot]  # type: ignore[return-value]
        value = load()
        with _LOCK:
            _MODELS[slot] = value
        return value


def peek(kind: str, key: Hashable) -> object | None:
    """The loaded model, or None when it is not loaded (loads nothing)."""
    with _LOCK:
        return _MODELS.get((kind, key))


def clear(kind: str | None = None) -> None:
    """Forget the loaded models (of one kind); for tests that count loads."""
    with _LOCK:
        for slot in [s for s in _MODELS if kind is None or s[0] == kind]:
            del _MODELS[slot]
