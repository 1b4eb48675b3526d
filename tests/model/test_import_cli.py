"""`python -m pipeline import-checkpoint`: official heads → safetensors with derived metadata."""
import torch

from pipeline.cli import main
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED
from pipeline.model.checkpoint import load_heads
from tests.model.helpers import official_head, official_state

TINY = ["--backbone", TINY_BACKBONE, "--pretrained", TINY_PRETRAINED]


def test_import_writes_heads_with_the_backbone_geometry(tmp_path):
    state = official_state(embed_dim=32, patches=64, seed=3, prefix="module.")
    source, target = tmp_path / "official.pyth", tmp_path / "heads.safetensors"
    torch.save({"model_state": state}, source)
    assert main(["import-checkpoint", str(source), str(target), "--k", "8", *TINY]) == 0
    heads, meta, _ = load_heads(str(target))
    assert (meta.backbone, meta.pretrained, meta.k) == (TINY_BACKBONE, TINY_PRETRAINED, 8)
    assert meta.blocks == (2, 3, 4) and meta.image_size == (64, 64)
    x = torch.randn(5, 64)
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    want = official_head(plain, "diff_head", x).float()
    torch.testing.assert_close(heads.holistic_head(x), want, atol=1e-5, rtol=1e-5)


def test_import_refuses_heads_of_another_geometry(tmp_path):
    source = tmp_path / "official.pyth"
    torch.save({"model_state": official_state(embed_dim=640, patches=225)}, source)
    assert main(["import-checkpoint", str(source), str(tmp_path / "h.safetensors"), *TINY]) == 1
    assert not (tmp_path / "h.safetensors").exists()
