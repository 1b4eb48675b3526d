"""Suite-wide settings: no test may reach a model hub; torch stays on the CPU threads we have."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def test_pipeline():
    """A factory of TestPipelines on the job's own offline runner."""
    from tests.beamtest import offline_pipeline

    return offline_pipeline


@pytest.fixture
def mvtec_tree(tmp_path) -> str:
    """A small MVTec-layout tree (tests.mvtec_tree)."""
    from tests.mvtec_tree import make_mvtec_tree

    return make_mvtec_tree(tmp_path)
