"""Throughput benchmark: the bare backbone forward against the whole scoring pipeline.

    python -m bench.throughput                      # full-size ViT-B-16-plus-240, N=512, CPU
    python -m bench.throughput --n 24 --backbone InCTRL-Tiny-ViT-TESTONLY   # quick check

In one process it writes N synthetic images and a manifest over them (k references and
N - k queries of one category, so the pipeline runs exactly N backbone forwards), then
times
  (a) the bare backbone forward over the N images, already decoded and preprocessed,
      batched as the pipeline batches them (--batch-size), with the same torch threads;
  (b) the whole ``score`` job on the same N images (DirectRunner, in-process): cold
      (prompt ensemble encoded by the text tower), with a warm prompt cache
      (``--feature-cache``; cached reference features are deleted first, so both runs do
      the same N image forwards), and once more on k + 1 images only, which measures the
      fixed cost of a run and so the marginal throughput a long run approaches.
The model is loaded and warmed up (one batch) before (a) and (b); neither timing includes
the load or the warm-up, and (b) reuses the loaded model (one model per process, as on a
worker). (a) runs before and after (b) (the decoded images are dropped in between, so they
do not inflate (b)'s memory); the ratio uses their mean. Decoding, the prompt ensemble and
the model load are timed apart and reported beside the ratio.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import tempfile

import torch

from bench.data import CATEGORY, one_group_manifest, write_images
from bench.measure import (PeakMemory, Timer, beam_metrics, command_line, machine, today,
                           work_summary)
from pipeline.core.config import ScoreConfig
from pipeline.core.images import decode_image, read_bytes
from pipeline.model.backbone import BackboneSpec, get_backbone
from pipeline.model.inctrl import build_text_features
from pipeline.model.prompts import prompts_for
from pipeline.model.shared import clear
from pipeline.run import run_score
from transforms.prompts import PROMPT_PAIRS

LOG = logging.getLogger("bench.throughput")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="images in all (k references + queries)")
    p.add_argument("--k", type=int, default=4, help="references (the few shots)")
    p.add_argument("--batch-size", type=int, default=16, help="as the pipeline's --batch-size")
    p.add_argument("--backbone", default="ViT-B-16-plus-240")
    p.add_argument("--pretrained", default="random:0",
                   help="random weights have the same FLOPs; or a tag/file to measure real weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"),
                   help="default: bf16 on CUDA, fp32 on CPU (as the pipeline)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--image-size", type=int, default=512, help="side of the square test images")
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--runs", default="cold,warm,fixed",
                   help="pipeline runs: 'cold' (empty feature cache), 'warm' (prompt cache warm), "
                        "'fixed' (warm, on k + 1 images only: the cost of a run itself)")
    p.add_argument("--bare-repeats", type=int, default=2,
                   help="runs of (a); with 2, one before and one after (b)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-bench"),
                   help="images are kept here and reused between invocations")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.n <= args.k:
        p.error("--n must exceed --k (there must be queries)")
    for run in args.runs.split(","):
        if run not in ("cold", "warm", "fixed"):
            p.error(f"unknown run {run!r}")
    return args


def bare_forward(backbone, pixels: list[torch.Tensor], batch_size: int) -> float:
    """Seconds for the backbone over every image, in the pipeline's batches (stack + forward)."""
    with Timer() as t:
        for start in range(0, len(pixels), batch_size):
            backbone.encode_images(torch.stack(pixels[start:start + batch_size]))
    return t.seconds


def drop_image_features(cache_root: str) -> int:
    """Delete cached image features, keep cached prompt embeddings (``text`` folders)."""
    removed = 0
    for folder, dirs, files in os.walk(cache_root):
        if os.path.basename(folder) == "text":
            dirs[:] = []
            continue
        for name in files:
            if name.endswith(".safetensors"):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    spec = BackboneSpec(args.backbone, args.pretrained, device=args.device, precision=precision)
    n, k, bs = args.n, args.k, args.batch_size
    mem = PeakMemory()
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "backbone": spec.backbone_id, "device": args.device, "precision": precision,
                 "n": n, "k": k, "batch_size": bs, "threads": torch.get_num_threads(),
                 "images": f"{args.image_size}x{args.image_size} {args.image_format.upper()}",
                 "peak_rss_mib": {}}
    peaks = res["peak_rss_mib"]

    img_dir = os.path.join(args.workdir, f"images-{args.image_size}-{args.image_format}")
    paths = write_images(img_dir, n, args.image_size, args.image_format)
    manifest = os.path.join(args.workdir, f"manifest-{n}-{k}-{args.image_size}-"
                            f"{args.image_format}.parquet")
    one_group_manifest(paths, k, manifest)

    with mem.phase(peaks, "load"), Timer() as t:
        backbone = get_backbone(spec)
    res["load_s"] = t.seconds

    with Timer() as t:  # what LoadImages does per image, in this one process
        pixels = [backbone.preprocess(decode_image(read_bytes(p))) for p in paths]
    res["decode_ms_per_image"] = 1e3 * t.seconds / n

    backbone.encode_images(torch.stack(pixels[:bs]))  # warm-up, for (a) and (b) alike
    res["bare_s"] = []

    def run_bare() -> None:
        with mem.phase(peaks, f"bare_{len(res['bare_s']) + 1}"):
            res["bare_s"].append(bare_forward(backbone, pixels, bs))
        LOG.warning("(a) bare forward: %.1f s", res["bare_s"][-1])

    run_bare()
    with Timer() as t:
        build_text_features(backbone, CATEGORY)
    res["prompt_s"] = t.seconds
    res["prompts"] = sum(len(side) for side in prompts_for(CATEGORY))

    cache = os.path.join(args.workdir, "feature-cache")
    shutil.rmtree(cache, ignore_errors=True)
    small = manifest.replace(".parquet", "-fixed.parquet")
    one_group_manifest(paths[:k + 1], k, small)
    del pixels  # (b) decodes for itself; (a) decodes again afterwards
    gc.collect()
    res["pipeline"] = {}
    for run in args.runs.split(","):
        if run != "cold":
            res["dropped_image_features"] = drop_image_features(cache)
        else:  # the text tower runs: nothing this process encoded before is reused
            clear(PROMPT_PAIRS)
        output = os.path.join(args.workdir, f"out-{run}")
        shutil.rmtree(output, ignore_errors=True)
        config = ScoreConfig(manifest=small if run == "fixed" else manifest, output=output, k=k,
                             seeds=(0,), backbone=spec,
                             batch_size=bs, feature_cache=cache, run_date="2000-01-01",
                             run_id=f"bench-{run}")
        with mem.phase(peaks, f"pipeline_{run}"), Timer() as t:
            result = run_score(config, [])
        work = work_summary(beam_metrics(result))
        res["pipeline"][run] = {"seconds": t.seconds, **work}
        LOG.warning("(b) pipeline %s: %.1f s %s", run, t.seconds, work)
        shutil.rmtree(output, ignore_errors=True)

    if args.bare_repeats > 1:
        pixels = [backbone.preprocess(decode_image(read_bytes(p))) for p in paths]
        for _ in range(args.bare_repeats - 1):
            run_bare()
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _images(res: dict, run: str) -> int:
    return res["k"] + 1 if run == "fixed" else res["n"]


def report(res: dict) -> None:
    n = res["n"]
    bare = sum(res["bare_s"]) / len(res["bare_s"])
    bare_ips = n / bare
    peaks = res["peak_rss_mib"]
    w = sys.stdout.write
    w(f"\nInCTRL scoring throughput  ({res['date']})\n")
    w(f"machine:  {res['machine']}\n")
    w(f"command:  {res['command']}\n")
    w(f"workload: {res['backbone']} {res['precision']} on {res['device']}; N={n} images "
      f"({res['k']} references + {n - res['k']} queries, one category), k={res['k']}, "
      f"batch {res['batch_size']}, {res['images']}\n")
    w("timing:   model loaded and warmed up (one batch) before (a) and (b); neither includes "
      "load or warm-up\n\n")
    w(f"{'':40}{'seconds':>9}{'images/s':>10}{'vs (a)':>8}{'peak RSS':>10}\n")
    for i, s in enumerate(res["bare_s"], 1):
        w(f"{f'(a) bare forward, run {i}':40}{s:9.1f}{n / s:10.2f}{'':>8}"
          f"{peaks.get(f'bare_{i}', float('nan')):7.0f} MiB\n")
    labels = {"cold": "(b) score pipeline, cold", "warm": "(b) score pipeline, warm prompt cache",
              "fixed": f"(b) same, on {res['k'] + 1} images only"}
    runs = res["pipeline"]
    for run, r in runs.items():
        ips = _images(res, run) / r["seconds"]
        w(f"{labels[run]:40}{r['seconds']:9.1f}{ips:10.2f}{ips / bare_ips:8.1%}"
          f"{peaks.get(f'pipeline_{run}', float('nan')):7.0f} MiB\n")
    w(f"\n(a) mean {bare_ips:.2f} images/s over {len(res['bare_s'])} run(s).\n")
    marginal = None
    if "warm" in runs and "fixed" in runs:
        extra = n - _images(res, "fixed")
        spent = runs["warm"]["seconds"] - runs["fixed"]["seconds"]
        marginal = extra / spent if spent > 0 else None
    if marginal is None and "fixed" in runs:
        w("Marginal throughput: n/a (needs the warm run, and more images than the noise)\n")
    elif marginal is not None:
        w(f"Fixed cost of a run (graph, stages, side inputs; {res['k'] + 1} images): "
          f"{runs['fixed']['seconds']:.1f} s. Marginal throughput, warm run minus that one: "
          f"{marginal:.2f} images/s = {marginal / bare_ips:.1%} of (a), what a long run "
          "approaches.\n")
    init = "random init; " if "@random" in res["backbone"] else ""
    w(f"Apart: model load {res['load_s']:.1f} s ({init}peak RSS {peaks['load']:.0f} MiB);"
      f" decode + preprocess {res['decode_ms_per_image']:.1f} ms/image (one process); prompt "
      f"ensemble ({res['prompts']} prompts, text tower) {res['prompt_s']:.1f} s = the forward "
      f"time of {res['prompt_s'] * bare_ips:.0f} images.\n")
    for run, r in res["pipeline"].items():
        model_s = r["query_model_s"] + r["reference_model_s"]
        w(f"{run}: forwards {r['reference_forwards']:.0f} reference + {r['query_forwards']:.0f} "
          f"query ({r['query_batches']:.0f} query batches); {r['queries_scored']:.0f} scored; "
          f"{r['reference_sets_prepared']:.0f} reference set(s) prepared; prompt sets "
          f"encoded {r['prompt_sets_encoded']:.0f}, from cache {r['prompt_sets_from_cache']:.0f};"
          f" time in the backbone (RunInference) {model_s:.1f} s, everything else "
          f"{r['seconds'] - model_s:.1f} s\n")
        if r["reference_forwards"] + r["query_forwards"] != _images(res, run):
            w(f"  NOTE: {r['reference_forwards'] + r['query_forwards']:.0f} forwards, not "
              f"{_images(res, run)}: "
              "(a) and (b) did different backbone work\n")
    cells = [f"(a) {bare_ips:.2f} img/s"] + [
        f"(b) {run} {n / r['seconds']:.2f} img/s ({n / r['seconds'] / bare_ips:.0%})"
        for run, r in runs.items() if run != "fixed"]
    if marginal is not None:
        cells.append(f"marginal {marginal / bare_ips:.0%}")
    cells.append("peak RSS (b) " + "/".join(f"{peaks[f'pipeline_{r}']:.0f}" for r in runs
                                            if r != "fixed") + " MiB")
    w("\nMarkdown row for bench/RESULTS.md:\n")
    w(f"| {res['date']} | {res['machine']} | `{res['command']}` | {'; '.join(cells)} |\n")


if __name__ == "__main__":
    sys.exit(main())
