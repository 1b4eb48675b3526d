"""The training job end to end on the tiny backbone: extraction, training, reuse, scoring.

In the synthetic data an anomaly is a global colour change (colour channels rotated). The
training-free patch residual finds it only in part, because normal images vary in brightness,
contrast and noise, which also raises their residuals. Untrained heads give an almost constant
holistic score, so the final score ranks like the patch residual; trained heads learn the
colour change from the image-level residual, so the final score's validation AUROC must rise.
Validation uses held-out images (another generator seed) of the training categories: with a
random-weight backbone, learning does not carry over to unseen categories.

One module-scoped training run (extracting features once) serves every test here.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli.train import main as train_main
from pipeline.core.config import ScoreConfig
from pipeline.core.feature_cache import FeatureCache
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.checkpoint import load_heads
from pipeline.model.inctrl import InCTRLModel, build_text_features
from pipeline.run import run_score
from pipeline.train.config import TrainConfig
from pipeline.train.data import FeatureStore, read_index
from pipeline.train.validate import ValidationSet, score_validation, validation_metrics
from pipeline.train_job import run_training

SIZE = 64
CATEGORIES = ("alpha", "beta", "gamma")
K = 4
STEPS, EPOCHS = 100, 3


def _texture(category: str) -> np.ndarray:
    """The category's normal look: two crossed sine gratings in one colour, (SIZE, SIZE, 3)."""
    rng = np.random.default_rng(zlib.crc32(category.encode()))
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    f1, f2 = rng.uniform(3, 8, 2)
    theta = rng.uniform(0, np.pi)
    u, v = x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)
    base = 0.5 + 0.25 * np.sin(2 * np.pi * f1 * u) + 0.15 * np.cos(2 * np.pi * f2 * v)
    return base[..., None] * rng.uniform(0.4, 1.0, 3)


def _image(category: str, rng: np.random.Generator, anomalous: bool) -> Image.Image:
    """A normal image varies in contrast, brightness and noise; an anomaly also in colour."""
    img = _texture(category) * rng.uniform(0.5, 1.5) + rng.uniform(-0.25, 0.25)
    img = img + rng.normal(0.0, rng.uniform(0.0, 0.12), img.shape)
    if anomalous:
        img = img[..., [2, 0, 1]]
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def write_dataset(root: str, seed: int, refs: int, good: int, bad: int) -> tuple[str, str]:
    """An MVTec-layout dataset 'synthetic' under ``root``; same seed → same files."""
    for category in CATEGORIES:
        splits = [("train/good", False, refs), ("test/good", False, good),
                  ("test/colour", True, bad)]
        for split, anomalous, n in splits:
            folder = os.path.join(root, "synthetic", category, split)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, zlib.crc32(f"{category}/{split}".encode()), i])
                _image(category, rng, anomalous).save(os.path.join(folder, f"{i:03d}.png"))
    return os.path.join(root, "synthetic"), "synthetic"


@pytest.fixture(scope="module")
def single_thread():
    # The tiny model's tensors are far too small to gain from threads; on a shared 2-core
    # machine two intra-op threads mostly wait for each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, single_thread) -> dict:
    root = str(tmp_path_factory.mktemp("train_job"))
    train = make_manifest([write_dataset(os.path.join(root, "train_data"), 0, 4, 12, 12)])
    broken = os.path.join(root, "broken.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG signature and nothing else
    extra = pd.DataFrame({
        "image_uri": [broken, os.path.join(root, "missing.png")],
        "image_id": ["broken", "missing"], "dataset": "synthetic", "category": "alpha",
        "role": "query", "label": pd.array([1, 0], dtype="Int64"), "defect_type": None,
    })
    train = pd.concat([train, extra], ignore_index=True)
    val = make_manifest([write_dataset(os.path.join(root, "val_data"), 1, 4, 6, 6)])
    paths = {"train": os.path.join(root, "train.parquet"), "val": os.path.join(root, "val.parquet"),
             "cache": os.path.join(root, "cache"), "root": root}
    write_manifest(train, paths["train"])
    write_manifest(val, paths["val"])
    return paths


@pytest.fixture(scope="module")
def trained(workspace):
    config = TrainConfig(
        manifest=workspace["train"], output=os.path.join(workspace["root"], "run1"), k=K,
        epochs=EPOCHS, steps_per_epoch=STEPS, batch_size=16, seed=0, backbone=tiny_spec(),
        validate_manifest=workspace["val"], feature_cache=workspace["cache"], log_every=100)
    return config, run_training(config)


def _cache_files(root: str) -> dict[str, int]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_training_lowers_the_loss_and_beats_untrained_heads(trained, workspace):
    config, result = trained
    losses = result.fit.log.losses()
    assert len(losses) == EPOCHS * STEPS
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    assert last < 0.6 * first, (first, last)

    epochs = result.fit.log.epochs
    untrained = epochs[0]["val_auroc"]
    assert epochs[0]["epoch"] == 0 and epochs[0]["steps"] == 0
    assert untrained < 0.9  # the colour anomalies fool the patch residual
    assert result.fit.best_metrics["auroc"] > untrained + 0.05
    assert epochs[-1]["val_auroc"] > untrained + 0.05  # not only thanks to picking the best

    # The file holds the kept heads: scoring with it again gives the logged metrics.
    heads, meta, _ = load_heads(result.heads_path)
    scorer = InCTRLModel(result.scorer.geometry, heads)
    vset = ValidationSet(read_index(result.extraction.index["validate"]), K, config.seed)
    backbone = get_backbone(tiny_spec())
    text = {c: build_text_features(backbone, c) for c in vset.categories}
    store = FeatureStore(FeatureCache(workspace["cache"], tiny_spec()))
    metrics = validation_metrics(score_validation(scorer, store, vset, text, 16))
    assert metrics["auroc"] == pytest.approx(result.fit.best_metrics["auroc"])
    assert meta.extra["best_epoch"] == result.fit.best_epoch
    assert epochs[result.fit.best_epoch]["val_auroc"] == pytest.approx(metrics["auroc"])


def test_heads_metadata_and_training_log_are_written(trained, workspace):
    config, result = trained
    out = config.output
    _, meta, digest = load_heads(f"{out}/heads.safetensors")
    with open(workspace["train"], "rb") as f:
        assert meta.train_manifest_hash == hashlib.sha256(f.read()).hexdigest()
    geometry = result.scorer.geometry
    assert (meta.backbone, meta.pretrained) == (tiny_spec().name, tiny_spec().pretrained)
    assert (meta.embed_dim, meta.num_patches, meta.k) == (geometry.embed_dim,
                                                          geometry.num_patches, K)
    assert tuple(meta.blocks) == geometry.blocks and tuple(meta.image_size) == geometry.image_size
    for key in ("epochs", "steps", "lr", "seed", "best_epoch", "val_auroc", "val_auprc"):
        assert key in meta.extra, key
    assert digest == result.heads_hash
    assert os.path.exists(f"{out}/heads_last_epoch.safetensors")

    steps = pq.read_table(f"{out}/train_log.parquet").to_pandas()
    assert len(steps) == EPOCHS * STEPS and steps["step"].tolist() == list(range(1, 301))
    assert (steps["lr"] == 1e-3).all() and steps["wall_time_s"].is_monotonic_increasing
    assert np.allclose(steps["loss"], steps["loss_final"] + steps["loss_image_residual"])
    epochs = pq.read_table(f"{out}/epochs.parquet").to_pandas()
    assert epochs["epoch"].tolist() == [0, 1, 2, 3]
    assert epochs[["val_auroc", "val_auprc"]].notna().all().all()
    with open(f"{out}/train_log.json") as f:
        doc = json.load(f)
    assert [s["loss"] for s in doc["steps"]] == steps["loss"].tolist()
    assert doc["heads_hash"] == digest and doc["metadata"]["extra"]["best_epoch"] >= 1
    scores = pd.read_parquet(f"{out}/validation_scores.parquet")
    assert len(scores) == 3 * (6 + 6)


def test_unloadable_images_are_logged_and_counted(trained):
    _, result = trained
    errors = pd.read_parquet(result.extraction.errors)
    assert sorted(errors["image_id"]) == ["broken", "missing"]
    assert set(errors["stage"]) == {"decode_image", "read_image"}
    assert (errors["split"] == "train").all()
    assert result.extraction.failed_rows == 2
    index = read_index(result.extraction.index["train"])
    assert not {"broken", "missing"} & set(index["image_id"])
    assert result.extraction.indexed == {"train": 3 * (4 + 12 + 12), "validate": 3 * (4 + 6 + 6)}
    assert result.extraction.cache_misses == 3 * 28 + 3 * 16  # every image extracted once


def test_second_run_reuses_the_cache_and_repeats_the_loss_curve(trained, workspace):
    config, first = trained
    before = _cache_files(workspace["cache"])
    out = os.path.join(workspace["root"], "run2")
    status = train_main([
        "--manifest", workspace["train"], "--output", out, "--k", str(K), "--epochs", "1",
        "--steps-per-epoch", "20", "--batch-size", "16", "--seed", "0",
        "--backbone", tiny_spec().name, "--pretrained", tiny_spec().pretrained,
        "--feature-cache", workspace["cache"], "--validate-manifest", workspace["val"],
    ])
    assert status == 0
    with open(f"{out}/train_log.json") as f:
        doc = json.load(f)
    assert doc["extraction"]["cache_misses"] == 0
    assert doc["extraction"]["cache_hits"] == 3 * 28 + 3 * 16
    assert _cache_files(workspace["cache"]) == before  # nothing written or rewritten
    # Same seed, same data: the same loss curve, step for step.
    assert [s["loss"] for s in doc["steps"]] == first.fit.log.losses()[:20]


def test_saved_heads_loaded_by_score_reproduce_the_in_memory_scores(trained, workspace):
    config, result = trained
    output = os.path.join(workspace["root"], "scored")
    run_score(ScoreConfig(manifest=workspace["val"], output=output, k=K, seeds=(config.seed,),
                           backbone=tiny_spec(), checkpoint=result.heads_path,
                           feature_cache=workspace["cache"]), [])
    job = ds.dataset(f"{output}/scores", format="parquet", partitioning="hive").to_table()
    job = job.to_pandas().set_index("image_id").sort_index()
    memory = result.fit.validation_scores.set_index("image_id").sort_index()
    assert len(job) == len(memory) == 3 * (6 + 6)
    assert (job.index == memory.index).all()
    assert (job["heads_hash"] == result.heads_hash).all()
    for column in ("final_score", "holistic_score", "image_residual_score", "fine_score"):
        assert np.allclose(job[column], memory[column], atol=1e-5, rtol=0), column
    # The job drew the same references as validation did.
    vset = ValidationSet(read_index(result.extraction.index["validate"]), K, config.seed)
    drawn = {g.category: list(g.reference_ids) for g in vset.groups}
    for category, refs in job.groupby("category")["reference_ids"].first().items():
        assert list(refs) == drawn[category]


def test_a_manifest_without_anomalies_is_refused_before_extraction(tmp_path, caplog):
    manifest = pd.DataFrame({"image_uri": ["a.png", "b.png"], "dataset": "d", "role": "query",
                             "label": pd.array([0, 0], dtype="Int64")})
    path = str(tmp_path / "normal_only.parquet")
    write_manifest(manifest, path)
    status = train_main(["--manifest", path, "--output", str(tmp_path / "out"),
                         "--backbone", tiny_spec().name, "--pretrained", tiny_spec().pretrained])
    assert status == 1
    assert "no anomalous (label 1) row" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--batch-size", "15"], ["--batch-size", "1"], ["--k", "0"],
                                   ["--lr", "0"], ["--lr-schedule", "linear"]])
def test_bad_flags_stop_with_a_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--manifest", "m.parquet", "--output", "out", *flags])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
