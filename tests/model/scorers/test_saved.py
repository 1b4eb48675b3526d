"""Trained scorers' files: a safetensors file whose header length starts with the byte a
pickle starts with (0x80) is still a safetensors file; a real pickle is refused by name."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.scorers.saved import TrainedScorerError, load_trained, save_trained


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    path = str(tmp_path / "x.safetensors")
    for pad in range(600):  # lengthen the metadata until the header's first byte is 0x80
        save_trained(path, {"t": torch.ones(2)}, {"format": "f/1", "pad": "x" * pad})
        if open(path, "rb").read(1) == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    tensors, meta, _ = load_trained(path, "f/1", "test file")
    assert torch.equal(tensors["t"], torch.ones(2)) and meta["format"] == "f/1"


def test_a_pickle_is_refused_by_name(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"t": torch.ones(2)}, path)
    with pytest.raises(TrainedScorerError, match="pickle"):
        load_trained(path, "f/1", "test file")
