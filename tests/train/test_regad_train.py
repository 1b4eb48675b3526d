"""Training RegAD on the demo's auxiliary data: the official sampling of queries and
supports, a falling loss, determinism for a seed, and the train command end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cli.train import main as train_main
from pipeline.cli.train import parse_train_args
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.scorers.regad import RegadModel, RegadSpec, load_regad
from pipeline.train.config import RegadTrainConfig
from pipeline.train.data import TrainingDataError
from pipeline.train.regad import (NormalImages, RegadSettings, SupportSampler, cnn_batch_norms,
                                  epoch_lr, fit_regad, read_normal_images)
from pipeline.train_job import REGAD_FILE, run_regad_training

SIZE = 32


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("regad")
    pairs = generate_demo(str(root / "data"), image_size=SIZE, n_train=4, n_test_good=1,
                          n_test_defect_per_type=1)
    path = str(root / "manifest.parquet")
    write_manifest(make_manifest(pairs), path)
    return path


@pytest.fixture(scope="module")
def images(manifest) -> NormalImages:
    return read_normal_images(manifest, SIZE)


def test_normal_images_are_the_manifests_label_0_rows(manifest, images):
    import pandas as pd

    frame = pd.read_parquet(manifest)
    assert len(images.image_ids) == int((frame["label"] == 0).sum())
    assert images.pixels.dtype == torch.uint8 and images.pixels.shape[1:] == (3, SIZE, SIZE)
    assert all(len(v) >= 2 for v in images.by_group().values())


def test_batches_hold_one_category_and_supports_never_the_query(images):
    sampler = SupportSampler(images, batch_size=3, k=5, seed=0)
    epoch = sampler.epoch()
    queries = np.concatenate([q for q, _ in epoch])
    assert sorted(queries.tolist()) == list(range(len(images.image_ids)))  # each once
    for q, s in epoch:
        assert s.shape == (len(q), 5) and 2 <= len(q) <= 4  # a lone last query joins in
        assert len({images.groups[i] for i in np.concatenate([q, s.ravel()])}) == 1
        assert all(qi not in si for qi, si in zip(q, s))
    again = SupportSampler(images, batch_size=3, k=5, seed=0).epoch()
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(epoch, again))


def test_cosine_schedule_starts_at_the_full_rate():
    assert epoch_lr(0.1, 1, 4) == pytest.approx(0.1)
    assert epoch_lr(0.1, 3, 4) == pytest.approx(0.05)
    assert epoch_lr(0.1, 4, 4) > 0


def _train(images: NormalImages, seed: int, epochs: int = 4):
    model = RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE, seed=seed))
    sampler = SupportSampler(images, batch_size=6, k=2, seed=seed)
    log = fit_regad(model, images, sampler, RegadSettings(epochs=epochs, lr=0.05))
    return model, log


def test_training_lowers_the_loss_and_is_deterministic(images):
    model, log = _train(images, seed=0)
    means = [e["mean_loss"] for e in log.epochs]
    assert means[-1] < means[0] - 0.05
    again, log2 = _train(images, seed=0)
    assert log.losses() == log2.losses()
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    moved = model.backbone.stn1.fc[2].bias.detach()
    assert not torch.equal(moved, torch.tensor([0.0, 1.0, 1.0]))  # the transformers learned
    _, other = _train(images, seed=1, epochs=1)
    assert other.losses() != log.losses()[:len(other.losses())]


def _running_stats(model: RegadModel, cnn: bool) -> dict[str, torch.Tensor]:
    """Every BatchNorm running mean/var of the CNN (cnn=True) or of the rest."""
    norms = {id(m) for m in cnn_batch_norms(model)}
    return {f"{name}.{key}": getattr(m, key).clone()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (id(m) in norms) == cnn
            for key in ("running_mean", "running_var")}


def test_freeze_bn_keeps_the_cnns_statistics_and_trains_the_rest(images):
    """PyTorch's BatchNorm in eval mode normalises with its running statistics and leaves
    them alone: with freeze_bn the CNN's stay bit-identical to the initial weights' while
    the weights train; the transformers' and heads' own BatchNorm layers (new layers, no
    statistics to keep) still update. Without it (the official code) the CNN's move."""
    spec = RegadSpec("resnet18", "random:0", image_size=SIZE, seed=0)
    start = RegadModel(spec)
    names = [n for n, m in start.backbone.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(cnn_batch_norms(start)) == len([n for n in names if not n.startswith("stn")])
    assert cnn_batch_norms(start) and len(cnn_batch_norms(start)) < len(names)
    runs = {}
    for freeze in (True, False):
        model = RegadModel(spec)
        sampler = SupportSampler(images, batch_size=6, k=2, seed=0)
        fit_regad(model, images, sampler, RegadSettings(epochs=1, lr=0.05, freeze_bn=freeze))
        runs[freeze] = model
        assert not model.training  # left in eval mode either way
        conv = next(n for n, _ in model.backbone.named_parameters() if not n.startswith("stn"))
        assert not torch.equal(model.backbone.get_parameter(conv),
                               start.backbone.get_parameter(conv)), freeze  # the CNN trained
        for key, value in _running_stats(model, cnn=False).items():
            assert not torch.equal(value, _running_stats(start, cnn=False)[key]), key
    frozen, official, initial = (_running_stats(m, cnn=True)
                                 for m in (runs[True], runs[False], start))
    assert all(torch.equal(frozen[k], initial[k]) for k in initial)
    assert not any(torch.equal(official[k], initial[k]) for k in initial)


def test_too_few_normal_images_is_a_training_data_error(tmp_path):
    pairs = generate_demo(str(tmp_path / "data"), image_size=SIZE, n_train=1, n_test_good=0,
                          n_test_defect_per_type=1)
    path = str(tmp_path / "m.parquet")
    write_manifest(make_manifest(pairs), path)
    with pytest.raises(TrainingDataError, match="two or more"):
        read_normal_images(path, SIZE)


def test_train_command_writes_a_loadable_checkpoint(manifest, tmp_path):
    out = tmp_path / "out"
    rc = train_main(["--method", "regad", "--manifest", manifest, "--output", str(out),
                     "--cnn-backbone", "resnet18", "--cnn-weights", "random:0",
                     "--cnn-image-size", str(SIZE), "--epochs", "1", "--k", "2",
                     "--batch-size", "4"])
    assert rc == 0
    model, meta, digest = load_regad(str(out / REGAD_FILE))
    assert meta["backbone"] == "resnet18" and meta["init_weights"] == "random:0"
    assert meta["image_size"] == SIZE and meta["extra"]["k"] == 2
    assert meta["extra"]["epochs"] == 1 and len(meta["augmentations"]) == 22
    info = json.loads((out / "train_log.json").read_text())
    assert info["checkpoint_hash"] == digest and info["method"] == "regad"
    assert (out / "train_log.parquet").exists() and (out / "epochs.parquet").exists()


def test_train_flags_for_regad(manifest):
    config, _ = parse_train_args(["--method", "regad", "--manifest", manifest, "--output", "o"])
    assert isinstance(config, RegadTrainConfig)
    assert (config.cnn_backbone, config.cnn_weights, config.image_size) == \
        ("resnet18", "IMAGENET1K_V1", 224)
    assert (config.epochs, config.batch_size, config.lr, config.momentum) == (50, 32, 1e-4, 0.9)
    for bad in (["--steps-per-epoch", "3"], ["--coop-context", "4"], ["--pretrained", "x"],
                ["--lr-schedule", "cosine"]):
        with pytest.raises(SystemExit):
            parse_train_args(["--method", "regad", "--manifest", manifest, "--output", "o",
                              *bad])


def test_unreadable_weights_fail_the_command_cleanly(manifest, tmp_path, caplog):
    rc = train_main(["--method", "regad", "--manifest", manifest, "--output",
                     str(tmp_path / "o"), "--cnn-weights", str(tmp_path / "none.pth"),
                     "--cnn-image-size", str(SIZE), "--epochs", "1"])
    assert rc == 1 and "train failed" in caplog.text


def test_run_regad_training_direct(manifest, tmp_path):
    config = RegadTrainConfig(manifest, str(tmp_path / "o"), k=1, epochs=1, batch_size=8,
                              cnn_weights="random:0", image_size=SIZE)
    result = run_regad_training(config)
    assert result.metadata["extra"]["train_images"] > 0
    assert result.log.losses() and all(np.isfinite(result.log.losses()))
