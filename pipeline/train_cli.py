"""``python -m pipeline train``: train InCTRL's adapter and heads on an auxiliary manifest."""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from pipeline.train.config import add_train_flags, train_config_from_args

LOG = logging.getLogger(__name__)

DESCRIPTION = """\
Train InCTRL's adapter and two scoring heads on an auxiliary dataset; the CLIP towers stay
frozen. Features are extracted once into a feature cache (reused by later runs), then every
labelled manifest row is a training query with k normal prompts of its dataset and category,
drawn anew at every step. Batches are half normal, half anomalous. Loss: binary focal loss
(alpha 1, gamma 2) on the final score plus on the image-residual score, optimised with AdamW.
The focal loss is computed on the scores as probabilities (InCTRL's published code passes
sigmoid outputs to a with-logits loss, i.e. applies the sigmoid twice; this does not).
Unrecognised flags go to Apache Beam (the extraction job), e.g. --runner.
"""

EPILOG = """\
outputs in OUTPUT: heads.safetensors (score with: python -m pipeline score --checkpoint
OUTPUT/heads.safetensors ...), train_log.parquet / epochs.parquet / train_log.json,
validation_scores.parquet, index/, feature_cache/.
"""


def parse_train_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m pipeline train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(parser)
    args, beam_args = parser.parse_known_args(argv)
    try:
        config = train_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return config, beam_args


def train_main(argv: list[str]) -> int:
    """Entry point of ``python -m pipeline train``; returns the exit status."""
    from pipeline.train.data import MissingFeaturesError, TrainingDataError
    from pipeline.train.job import run_training

    config, beam_args = parse_train_args(argv)
    try:
        result = run_training(config, beam_args)
    except (TrainingDataError, MissingFeaturesError) as exc:
        LOG.error("train failed: %s", exc)
        return 1
    LOG.info("Heads: %s (best epoch %d%s)", result.heads_path, result.fit.best_epoch,
             ", validation AUROC %.4f" % result.fit.best_metrics["auroc"]
             if result.fit.best_metrics else "")
    return 0
