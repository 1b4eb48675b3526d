"""Training InCTRL's adapter and heads on an auxiliary dataset, with the CLIP towers frozen.

The backbone runs once per image (``extract``) into the on-disk feature cache; the loop then
trains from cached features (``data``, ``forward``, ``loss``, ``loop``), validates on a held-out
manifest (``validate``) and writes the heads and a training log (``job``, ``log``).
"""
from pipeline.train.config import TrainConfig
from pipeline.train.job import TrainResult, run_training

__all__ = ["TrainConfig", "TrainResult", "run_training"]
