"""Training InCTRL's adapter and heads on an auxiliary dataset, with the CLIP towers frozen.

The backbone runs once per image (``extract``) into the on-disk feature cache; the loop then
trains from cached features (``data``, ``forward``, ``loss``, ``loop``), validates on a held-out
manifest (``validate``) and writes the heads and a training log (``job``, ``log``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "TrainResult", "run_training"]


def __getattr__(name: str) -> Any:
    # Lazy, so that registering the CLI command does not import Beam.
    if name == "TrainConfig":
        from pipeline.train.config import TrainConfig

        return TrainConfig
    if name in ("TrainResult", "run_training"):
        from pipeline.train import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
