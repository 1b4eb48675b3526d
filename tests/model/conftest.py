"""Shared fixtures for the model-core tests: the tiny backbone is loaded once per session."""
from __future__ import annotations

import pytest

from pipeline.model.backbone import ClipBackbone, get_backbone, tiny_spec


@pytest.fixture(scope="session")
def tiny() -> ClipBackbone:
    """The shipped tiny random-weight backbone (64-pixel images, 8x8 patches, 3 blocks)."""
    return get_backbone(tiny_spec())
