"""Training CoOp's context on labelled auxiliary images with the tiny random CLIP: the train
command end to end (features extracted into the cache), separation of the training labels,
determinism, the schedule, and the flags.

The labelled set is the demo's normal images (label 0) and darkened copies of them (label
1, brightness ÷ 4): the random CLIP's image embeddings separate those linearly, so a
working prompt learner must separate them too. (The demo's own small defects are not
linearly separable in the random CLIP's 32-d embedding: a logistic regression on the
normalised embeddings reaches a training AUROC of about 0.67 there.)"""
from __future__ import annotations

import json

import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.cli.train import main as train_main
from pipeline.cli.train import parse_train_args
from pipeline.core.demo_data import generate_demo
from pipeline.core.feature_cache import FeatureCache
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import TINY_BACKBONE, get_backbone, tiny_spec
from pipeline.model.scorers.coop import (Coop, CoopPrompts, load_coop, load_coop_scorer,
                                         prompt_features)
from pipeline.train.config import CoopTrainConfig
from pipeline.train.coop import WARMUP_LR, CoopSettings, coop_epoch_lr, fit_coop
from pipeline.train.data import read_index
from pipeline.train_job import COOP_FILE

EPOCHS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("coop")
    pairs = generate_demo(str(root / "data"), image_size=64, n_train=4, n_test_good=0,
                          n_test_defect_per_type=0)
    for row in make_manifest(pairs).itertuples():
        dark = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(row.image_uri))),
                            "test", "dark")
        os.makedirs(dark, exist_ok=True)
        pixels = np.asarray(Image.open(row.image_uri).convert("RGB")) // 4
        Image.fromarray(pixels).save(os.path.join(dark, os.path.basename(row.image_uri)))
    manifest = str(root / "manifest.parquet")
    write_manifest(make_manifest(pairs), manifest)
    out = root / "out"
    rc = train_main(["--method", "coop", "--manifest", manifest, "--output", str(out),
                     "--backbone", TINY_BACKBONE, "--pretrained", "random:0",
                     "--epochs", str(EPOCHS), "--warmup-epochs", "0", "--lr", "0.01",
                     "--batch-size", "16", "--coop-context", "8"])
    assert rc == 0
    return manifest, out


def _training_embeds(out):
    index = read_index(str(out / "index" / "train.parquet"))
    index = index[index["label"].notna()]
    cache = FeatureCache(str(out / "_feature_cache"), tiny_spec())
    embeds = torch.cat([cache.get(h)["embeds"] for h in index["content_hash"]])
    return embeds, index["label"].to_numpy(dtype=int)


def test_trained_context_separates_the_training_labels(trained):
    _, out = trained
    backbone = get_backbone(tiny_spec())
    embeds, labels = _training_embeds(out)
    scorer, meta, _ = load_coop_scorer(str(out / COOP_FILE), backbone)
    trained_auc = roc_auc_score(labels, scorer.score({"embeds": embeds}).score.numpy())
    untrained = CoopPrompts(backbone.model, backbone.tokenizer, n_ctx=8, seed=0)
    with torch.no_grad():
        start = Coop(prompt_features(backbone.model, untrained),
                     float(backbone.model.logit_scale))
    start_auc = roc_auc_score(labels, start.score({"embeds": embeds}).score.numpy())
    assert trained_auc >= 0.95 and trained_auc > start_auc + 0.2
    assert meta["extra"]["train_images"]["anomalous"] == int(labels.sum())


def test_train_command_outputs(trained):
    _, out = trained
    ctx, meta, digest = load_coop(str(out / COOP_FILE))
    assert ctx.shape == (8, 64) and meta["n_ctx"] == 8
    assert meta["backbone"] == TINY_BACKBONE and meta["weights_id"] == "random:0"
    assert meta["class_names"] == ["normal", "anomalous"]
    info = json.loads((out / "train_log.json").read_text())
    assert info["checkpoint_hash"] == digest and info["method"] == "coop"
    losses = [s["loss"] for s in info["steps"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_fit_is_deterministic_for_a_seed(trained):
    _, out = trained
    backbone = get_backbone(tiny_spec())
    embeds, labels = _training_embeds(out)
    runs = []
    for seed in (2, 2, 3):
        prompts = CoopPrompts(backbone.model, backbone.tokenizer, n_ctx=4, seed=seed)
        log = fit_coop(backbone.model, prompts, embeds, torch.tensor(labels),
                       CoopSettings(epochs=2, batch_size=8, lr=0.01, warmup_epochs=0, seed=seed))
        runs.append((prompts.ctx.detach().clone(), log.losses()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], runs[2][0])


def test_schedule_warms_up_then_follows_a_cosine():
    s = CoopSettings(epochs=4, lr=0.1, warmup_epochs=1)
    assert coop_epoch_lr(s, 1) == WARMUP_LR
    assert coop_epoch_lr(s, 3) == pytest.approx(0.05)
    assert coop_epoch_lr(CoopSettings(epochs=4, lr=0.1, warmup_epochs=0), 1) == 0.1


def test_train_flags_for_coop():
    config, _ = parse_train_args(["--method", "coop", "--manifest", "m", "--output", "o"])
    assert isinstance(config, CoopTrainConfig)
    assert (config.n_ctx, config.class_names, config.epochs, config.batch_size, config.lr,
            config.weight_decay, config.warmup_epochs) == \
        (16, ("normal", "anomalous"), 50, 32, 2e-3, 5e-4, 1)
    config, _ = parse_train_args(["--method", "coop", "--manifest", "m", "--output", "o",
                                  "--coop-classes", "good,defective"])
    assert config.class_names == ("good", "defective")
    for bad in (["--k", "2"], ["--cnn-backbone", "resnet18"], ["--validate-manifest", "v"],
                ["--coop-classes", "normal"]):
        with pytest.raises(SystemExit):
            parse_train_args(["--method", "coop", "--manifest", "m", "--output", "o", *bad])


def test_inctrl_defaults_are_unchanged():
    config, _ = parse_train_args(["--manifest", "m", "--output", "o"])
    assert (config.k, config.epochs, config.steps_per_epoch, config.batch_size, config.lr,
            config.weight_decay, config.lr_schedule) == (4, 10, 100, 16, 1e-3, 0.01, "constant")
    for bad in (["--batch-size", "3"], ["--coop-context", "4"], ["--momentum", "0.5"]):
        with pytest.raises(SystemExit):
            parse_train_args(["--manifest", "m", "--output", "o", *bad])
