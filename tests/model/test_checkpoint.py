"""pipeline.model.checkpoint: safetensors round trip, refusal of unsafe or broken files, and
the mapping of the official InCTRL checkpoint onto our heads."""
from __future__ import annotations

import hashlib
import json
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from pipeline.model.backbone import TINY_BACKBONE, ClipBackbone, ImageFeatures, describe, tiny_spec
from pipeline.model.checkpoint import (
    CheckpointError,
    HeadsMetadata,
    convert_official_checkpoint,
    import_official_checkpoint,
    load_heads,
    read_heads_metadata,
    save_heads,
    towers_location,
)
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLModel
from tests.model.helpers import (
    geometry,
    official_adapter,
    official_head,
    official_state,
    perturbed,
)

EMBED, GRID = 8, (3, 3)
PATCHES = GRID[0] * GRID[1]
LAYERS, WIDTH = 2, 16


def _meta(**kw) -> HeadsMetadata:
    base = dict(backbone="InCTRL-Tiny-ViT-TESTONLY", pretrained="random:0", blocks=(1, 2),
                image_size=(12, 12), embed_dim=EMBED, num_patches=PATCHES, k=2,
                train_manifest_hash="abc123", extra={"lr": 0.1, "steps": 3})
    base.update(kw)
    return HeadsMetadata(**base)


def _features(batch: int, seed: int) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.randn(batch, LAYERS, PATCHES, WIDTH, generator=g),
                         torch.randn(batch, EMBED, generator=g))


def _text() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.nn.functional.normalize(torch.randn(2, EMBED, generator=g), dim=-1)


@pytest.fixture(scope="module")
def trained_heads() -> InCTRLHeads:
    """Heads after a few SGD steps, so BatchNorm running statistics are not the defaults."""
    heads = InCTRLHeads.seeded(EMBED, PATCHES, seed=0)
    scorer = InCTRLModel(geometry(EMBED, GRID, WIDTH), heads).train()
    opt = torch.optim.SGD(heads.parameters(), lr=0.1)
    for step in range(3):
        refs = scorer.prepare_references(_features(2, seed=100 + step))
        out = scorer(_features(6, seed=step), refs, _text())
        labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
        loss = (torch.nn.functional.binary_cross_entropy(out.holistic, labels)
                + torch.nn.functional.binary_cross_entropy(out.image_residual, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads.eval()
    assert int(heads.image_head.bn1.num_batches_tracked) == 3
    assert heads.holistic_head.bn2.running_mean.abs().sum() > 0
    assert not torch.allclose(heads.image_head.bn1.running_var, torch.ones(128))
    return heads


def _scores(heads: InCTRLHeads):
    scorer = InCTRLModel(geometry(EMBED, GRID, WIDTH), heads).eval()
    refs = scorer.prepare_references(_features(3, seed=7))
    return scorer(_features(4, seed=8), refs, _text())


def test_save_load_round_trip(tmp_path, trained_heads):
    path = str(tmp_path / "heads.safetensors")
    meta = _meta()
    digest = save_heads(trained_heads, path, meta)
    heads, loaded_meta, loaded_digest = load_heads(path)

    assert not heads.training
    assert loaded_meta == meta
    assert loaded_digest == digest
    want, got = trained_heads.state_dict(), heads.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    a, b = _scores(trained_heads), _scores(heads)
    for name in ("final", "fine", "holistic", "image_residual", "text_prior", "patch_map"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("pad", range(0, 256, 8))
def test_every_header_length_loads(tmp_path, pad, trained_heads):
    # safetensors headers start with their length; when its first byte is 0x80 (the pickle
    # protocol marker) the file must still load, and load what was saved.
    path = str(tmp_path / "heads.safetensors")
    meta = _meta(extra={"pad": "x" * pad})
    save_heads(trained_heads, path, meta)
    heads, loaded_meta, _ = load_heads(path)
    assert loaded_meta == meta
    want, got = trained_heads.state_dict(), heads.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_save_refuses_metadata_of_other_geometry(tmp_path):
    with pytest.raises(CheckpointError, match="geometry"):
        save_heads(InCTRLHeads(EMBED, PATCHES), str(tmp_path / "h.safetensors"),
                   _meta(num_patches=PATCHES + 1))


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_torch_save_pickle_is_refused(tmp_path, zipfile_format):
    path = tmp_path / "heads.pt"
    torch.save(InCTRLHeads(EMBED, PATCHES).state_dict(), path,
               _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(CheckpointError, match="pickle"):
        load_heads(str(path))


class _Trap:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_plain_pickle_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "heads.pkl"
    path.write_bytes(pickle.dumps({"w": _Trap(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_heads(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b"garbage", b"not a heads file at all, just text\n" * 20,
                                  bytes(range(256)) * 4])
def test_garbage_is_refused(tmp_path, data):
    path = tmp_path / "heads.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a valid InCTRL heads safetensors file"):
        load_heads(str(path))


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(st_save({"x": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="not a valid InCTRL heads"):
        load_heads(str(path))
    path.write_bytes(st_save({"x": torch.zeros(3)}, metadata={"inctrl": json.dumps({"format": "v0"})}))
    with pytest.raises(CheckpointError, match="inctrl-heads/1"):
        load_heads(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_heads(str(tmp_path / "nope.safetensors"))


def test_weights_that_contradict_the_metadata_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in InCTRLHeads(EMBED, PATCHES).state_dict().items()}
    path = tmp_path / "h.safetensors"
    path.write_bytes(st_save(state, metadata={"inctrl": _meta(num_patches=PATCHES + 3).to_json()}))
    with pytest.raises(CheckpointError, match="do not match the heads layout"):
        load_heads(str(path))


def test_heads_of_another_geometry_do_not_fit_the_scorer(tmp_path):
    path = str(tmp_path / "h.safetensors")
    save_heads(InCTRLHeads(EMBED, PATCHES), path, _meta())
    heads, _, _ = load_heads(path)
    with pytest.raises(ValueError, match=r"embed_dim=8, patches=9.*embed_dim=16, patches=9"):
        InCTRLModel(geometry(16, GRID, WIDTH), heads)
    with pytest.raises(ValueError, match=r"patches=16"):
        InCTRLModel(geometry(EMBED, (4, 4), WIDTH), heads)


# ------------------------------------------------------------------ official import


@pytest.mark.parametrize(
    "embed, patches, prefix, wrap",
    [(32, 64, "", True), (128, 9, "module.", True), (32, 64, "", False)],
    ids=["plain", "module-prefix-E128", "bare-state-dict"],
)
def test_import_official_checkpoint(tmp_path, embed, patches, prefix, wrap):
    state = official_state(embed, patches, seed=embed + patches, prefix=prefix)
    path = tmp_path / "checkpoint.pyth"
    torch.save({"model_state": state, "epoch": 9, "cfg": "TRAIN:\n  ENABLE: True\n"}
               if wrap else state, path)
    raw = {k[len(prefix):]: v for k, v in state.items()}

    heads = import_official_checkpoint(str(path))

    assert not heads.training
    assert (heads.embed_dim, heads.num_patches) == (embed, patches)
    assert set(heads.state_dict()) == set(InCTRLHeads(embed, patches).state_dict())
    g = torch.Generator().manual_seed(1)
    x_img = torch.randn(5, embed, generator=g)
    x_hol = torch.randn(5, patches, generator=g)
    for ours, theirs, x in ((heads.image_head, "diff_head_ref", x_img),
                            (heads.holistic_head, "diff_head", x_hol)):
        torch.testing.assert_close(ours.logits(x).double(), official_head(raw, theirs, x, logits=True),
                                   atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ours(x).double(), official_head(raw, theirs, x),
                                   atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(heads.adapter(x_img).double(), official_adapter(raw, x_img),
                               atol=1e-5, rtol=1e-5)


def test_official_input_batchnorm_is_unused(tmp_path):
    state = official_state(128, 9, seed=3)
    state2 = dict(state)
    for head in ("diff_head", "diff_head_ref"):
        for p in ("weight", "bias", "running_mean", "running_var"):
            state2[f"{head}.bn1.{p}"] = state[f"{head}.bn1.{p}"] * 3 + 1
    torch.save({"model_state": state}, tmp_path / "a.pyth")
    torch.save({"model_state": state2}, tmp_path / "b.pyth")
    a = import_official_checkpoint(str(tmp_path / "a.pyth")).state_dict()
    b = import_official_checkpoint(str(tmp_path / "b.pyth")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_official_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    torch.save({"model_state": official_state(32, 64), "extra": _Trap(marker)}, tmp_path / "c.pyth")
    with pytest.raises(CheckpointError, match="weights_only"):
        import_official_checkpoint(str(tmp_path / "c.pyth"))
    assert not marker.exists()


def test_official_import_refuses_non_torch_and_incomplete_files(tmp_path):
    (tmp_path / "g.pyth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        import_official_checkpoint(str(tmp_path / "g.pyth"))
    state = {k: v for k, v in official_state(32, 64).items() if not k.startswith("adapter.")}
    torch.save({"model_state": state}, tmp_path / "i.pyth")
    with pytest.raises(CheckpointError, match="lacks"):
        import_official_checkpoint(str(tmp_path / "i.pyth"))
    torch.save([1, 2, 3], tmp_path / "l.pyth")
    with pytest.raises(CheckpointError, match="model_state"):
        import_official_checkpoint(str(tmp_path / "l.pyth"))


def test_official_import_refuses_inconsistent_shapes(tmp_path):
    state = official_state(32, 64)
    state["diff_head_ref.projection1.weight"] = torch.randn(128, 40)  # not the adapter's 32
    torch.save({"model_state": state}, tmp_path / "x.pyth")
    with pytest.raises(CheckpointError, match="shape"):
        import_official_checkpoint(str(tmp_path / "x.pyth"))
    state = official_state(32, 64)
    del state["diff_head.bn3.running_var"]
    torch.save({"model_state": state}, tmp_path / "y.pyth")
    with pytest.raises(CheckpointError, match="missing"):
        import_official_checkpoint(str(tmp_path / "y.pyth"))


# ------------------------------------------------------------------ official towers


@pytest.fixture(scope="module")
def tiny_towers() -> dict:
    """The tiny backbone's weights, perturbed: towers no random seed gives."""
    return perturbed(ClipBackbone(tiny_spec()).model.state_dict(), seed=11)


def _convert(tmp_path, state, name="heads.safetensors"):
    source = tmp_path / "official.pyth"
    torch.save({"model_state": state, "epoch": 3}, source)
    geometry = describe(tiny_spec()).geometry
    output = tmp_path / name
    convert_official_checkpoint(str(source), str(output), backbone=TINY_BACKBONE,
                                geometry=geometry, k=4)
    return source, output


@pytest.mark.parametrize("prefix", ["", "module."])
def test_convert_keeps_the_official_towers_beside_the_heads(tmp_path, tiny_towers, prefix):
    state = official_state(32, 64, seed=5, prefix=prefix, towers=tiny_towers)
    source, output = _convert(tmp_path, state)
    heads, meta, _ = load_heads(str(output))
    towers = tmp_path / "heads.towers.safetensors"
    assert (meta.towers, meta.pretrained) == (towers.name, towers.name)
    assert meta.towers_sha256 == hashlib.sha256(towers.read_bytes()).hexdigest()
    assert meta.backbone == TINY_BACKBONE and meta.k == 4
    assert towers_location(str(output), meta) == str(towers)
    assert read_heads_metadata(str(output)) == meta
    # An open_clip weights file: exactly the model's keys, loadable strictly by open_clip.
    written = st_load_file(str(towers))
    assert written.keys() == tiny_towers.keys()
    assert all(torch.equal(written[k], tiny_towers[k]) for k in tiny_towers)
    model = open_clip.create_model(TINY_BACKBONE, pretrained=str(towers))
    got = model.state_dict()
    assert all(torch.equal(got[k], tiny_towers[k]) for k in tiny_towers)
    # ... and the heads are still the official ones.
    want = import_official_checkpoint(str(source)).state_dict()
    assert all(torch.equal(heads.state_dict()[k], want[k]) for k in want)


def test_convert_refuses_a_checkpoint_without_towers_and_writes_nothing(tmp_path, tiny_towers):
    partial = {k: v for k, v in tiny_towers.items() if not k.startswith("transformer.")}
    with pytest.raises(CheckpointError, match="lacks the CLIP towers"):
        _convert(tmp_path, official_state(32, 64, towers=partial))
    with pytest.raises(CheckpointError, match="lacks the CLIP towers"):
        _convert(tmp_path, official_state(32, 64))  # fake towers of no real model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.pyth"]


def test_convert_refuses_towers_of_another_shape(tmp_path, tiny_towers):
    towers = dict(tiny_towers)
    towers["visual.proj"] = torch.randn(64, 16)
    with pytest.raises(CheckpointError, match=r"shapes differ.*visual.proj"):
        _convert(tmp_path, official_state(32, 64, towers=towers))
    assert not (tmp_path / "heads.safetensors").exists()


def test_convert_names_the_towers_after_the_heads(tmp_path, tiny_towers):
    _, output = _convert(tmp_path, official_state(32, 64, towers=tiny_towers), name="mvtec-k4")
    assert read_heads_metadata(str(output)).towers == "mvtec-k4.towers.safetensors"
    assert (tmp_path / "mvtec-k4.towers.safetensors").is_file()


def test_metadata_without_towers_still_reads():
    d = json.loads(_meta().to_json())
    del d["towers"], d["towers_sha256"]
    meta = HeadsMetadata.from_json(json.dumps(d))
    assert (meta.towers, meta.towers_sha256) == ("", "")


@pytest.mark.parametrize("towers, sha", [("t.safetensors", ""), ("", "ab" * 32),
                                         ("/abs/t.safetensors", "ab" * 32),
                                         ("../t.safetensors", "ab" * 32),
                                         ("gs://b/t.safetensors", "ab" * 32)])
def test_metadata_towers_must_be_a_relative_file_with_its_checksum(towers, sha):
    with pytest.raises(CheckpointError):
        _meta(towers=towers, towers_sha256=sha)


def test_read_heads_metadata_refuses_what_load_heads_refuses(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a valid"):
        read_heads_metadata(str(tmp_path / "g.safetensors"))
    torch.save({"a": torch.zeros(2)}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="not a valid"):
        read_heads_metadata(str(tmp_path / "p.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        read_heads_metadata(str(tmp_path / "none.safetensors"))
