"""GPU benchmark: bare bf16 forward, scoring stage, decode ceiling and the whole pipeline.

    bench/gpu_bench.sh                         # on a GPU machine; under 5 minutes
    python -m bench.gpu --device cpu --backbone InCTRL-Tiny-ViT-TESTONLY --batch-size 8 \\
        --n-forward 32 --stage-n 32 --distinct 16 --e2e-n 40 --image-size 96   # CPU smoke test

In one process, on the full-size architecture with random weights (same FLOPs):
  (a)  the bare forward (``encode_images``: three intermediate layers + pooled embedding)
       under bf16 autocast, batch --batch-size, pixels already on the device;
  (b)  the scoring math alone on precomputed query features on the device: references
       prepared once, then ``InCTRLModel`` per batch, training-free and with heads;
  (b') the scoring stage as the pipeline runs it, without Beam's scheduling: the real
       ``ClipFeatureHandler.run_inference`` and ``_ScoreFn.process`` per batch of
       preprocessed CPU pixels (pixel upload, forward, feature copies, scoring, records),
       with the features handed over on the CPU (as ``run.py`` wires it) and kept on the
       device (``ExtractSuiteFeatures(..., on_device=True)``);
  (c)  the decode ceiling: LoadImages' per-image work (read, decode, preprocess, hash) on
       1 thread, on --decode-threads threads of one process (as the job's LoadImages
       decodes) and on --decode-procs processes;
  (d)  the ``score`` job end to end on the DirectRunner (in-process, --device/--precision),
       with its time inside the model from RunInference's counters.
Warm-up batches are excluded from (a), (b), (b'); (d) reuses the loaded model.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import tempfile

import torch

from bench.data import CATEGORY, DATASET, one_group_manifest, write_images
from bench.decode import decode_rate, decode_rate_threads, load_one
from bench.measure import (PeakMemory, Timer, beam_metrics, command_line, machine, today,
                           work_summary)
from pipeline.core.config import default_decode_threads
from pipeline.model.backbone import BackboneSpec, get_backbone

LOG = logging.getLogger("bench.gpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"),
                   help="default: bf16 on CUDA, fp32 on CPU (as the pipeline)")
    p.add_argument("--backbone", default="ViT-B-16-plus-240")
    p.add_argument("--pretrained", default="random:0")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--n-forward", type=int, default=4096, help="images timed in (a) and (b)")
    p.add_argument("--stage-n", type=int, default=2048, help="images timed in (b')")
    p.add_argument("--distinct", type=int, default=256,
                   help="distinct decoded images, reused cyclically in (a), (b), (b')")
    p.add_argument("--e2e-n", type=int, default=1024, help="images of the (d) manifest; 0 skips (d)")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--decode-procs", type=int, default=0,
                   help="processes for the decode ceiling (0: every usable core)")
    p.add_argument("--decode-threads", type=int, default=0,
                   help="the job's --decode-threads, also timed alone (0: the job's default)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-gpu-bench"))
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def _cycle(items: list, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


def bare_forward(backbone, pixels: torch.Tensor, batches: int, warmup: int = 3) -> float:
    """Seconds for ``batches`` forwards of the on-device batch ``pixels``."""
    for _ in range(warmup):
        backbone.encode_images(pixels)
    with Timer() as t:
        for _ in range(batches):
            backbone.encode_images(pixels)
    return t.seconds


def score_math(scorer, feats, refs, text, batches: int, warmup: int = 2) -> float:
    """Seconds for ``batches`` calls of the scorer on on-device features (as ``_ScoreFn``)."""
    with torch.no_grad():
        for _ in range(warmup):
            scorer(feats, refs, text)
        with Timer() as t:
            for _ in range(batches):
                scorer(feats, refs, text)
    return t.seconds


def seeded_heads(path: str, geometry, spec: BackboneSpec) -> str:
    from pipeline.model.checkpoint import HeadsMetadata, save_heads
    from pipeline.model.heads import InCTRLHeads

    save_heads(InCTRLHeads.seeded(geometry.embed_dim, geometry.num_patches, seed=0).eval(), path,
               HeadsMetadata(spec.name, spec.pretrained, geometry.blocks, geometry.image_size,
                             geometry.embed_dim, geometry.num_patches, k=4))
    return path


def scoring_stage(spec: BackboneSpec, pixels: list[torch.Tensor], n: int, batch_size: int,
                  k: int, text: torch.Tensor, workdir: str, on_device: bool) -> float:
    """(b'): seconds for ``n`` images through the pipeline's own handler and scoring DoFn."""
    from pipeline.core.config import ScoreConfig
    from pipeline.core.manifest import ManifestRow
    from pipeline.model.scorers.suite import TensorBundle
    from transforms.features import SuiteFeatureHandler
    from pipeline.core.feature_cache import FeatureCache
    from transforms.cache import cache_identities
    from transforms.references import ReferencePayload
    from transforms.score import _ScoreFn

    config = ScoreConfig(manifest="-", output=workdir, k=k, backbone=spec, batch_size=batch_size,
                         run_id="bench", run_date="2000-01-01")
    handler = SuiteFeatureHandler(config.suite, batch_size, on_device=on_device)
    model = handler.load_model()
    cache_root = f"{workdir}/features"
    fn = _ScoreFn(config, config.suite.identity(), cache_root)
    fn.setup()
    views = [TensorBundle({"clip": p}) for p in pixels]
    refs = handler.run_inference(views[:k], model)
    # As the job: the references' features in the feature cache, the set naming them.
    cache = FeatureCache(cache_root, cache_identities(config.suite, references=True)["clip"])
    ids = tuple(f"ref{i}" for i in range(k))
    for i, ref in zip(ids, refs):
        cache.put(i, ref.part("clip"))
    ref_sets = {(DATASET, CATEGORY, 0): ReferencePayload(ids, k, content={i: i for i in ids})}
    prompts = {CATEGORY: text.cpu()}
    rows = [ManifestRow(f"/img/{i}.png", DATASET, CATEGORY, "query", 0, f"q{i}", None, None)
            for i in range(batch_size)]

    def one_batch(batch: list[torch.Tensor]) -> int:
        feats = handler.run_inference([TensorBundle({"clip": p}) for p in batch], model)
        elements = [((rows[i], "sha"), f) for i, f in enumerate(feats)]
        return sum(1 for _ in fn.process(elements, ref_sets, prompts))

    batches = [_cycle(pixels, batch_size)] * max(1, n // batch_size)
    one_batch(batches[0])  # warm-up
    with Timer() as t:
        scored = sum(one_batch(b) for b in batches)
    if scored != len(batches) * batch_size:
        raise RuntimeError(f"(b') scored {scored} records, expected {len(batches) * batch_size}")
    return t.seconds * n / (len(batches) * batch_size)


def end_to_end(spec: BackboneSpec, paths: list[str], k: int, batch_size: int,
               decode_threads: int, workdir: str) -> dict:
    """The job on ``paths``; then on k + 1 of them, whose time is the fixed cost of a run."""
    from pipeline.core.config import ScoreConfig
    from pipeline.model.shared import clear
    from pipeline.run import run_score
    from transforms.prompts import PROMPT_PAIRS

    out = {}
    for name, subset in (("full", paths), ("fixed", paths[:k + 1])):
        clear(PROMPT_PAIRS)  # both runs encode the prompt ensemble: the fixed cost includes it
        manifest = os.path.join(workdir, f"manifest-e2e-{len(subset)}.parquet")
        one_group_manifest(subset, k, manifest)
        output = os.path.join(workdir, "out-e2e")
        shutil.rmtree(output, ignore_errors=True)
        config = ScoreConfig(manifest=manifest, output=output, k=k, seeds=(0,), backbone=spec,
                             batch_size=batch_size, decode_threads=decode_threads,
                             run_id="bench-e2e", run_date="2000-01-01")
        with Timer() as t:
            result = run_score(config, [])
        shutil.rmtree(output, ignore_errors=True)
        out[name] = {"seconds": t.seconds, "images": len(subset),
                     **work_summary(beam_metrics(result))}
    return {**out["full"], "fixed_seconds": out["fixed"]["seconds"],
            "fixed_images": out["fixed"]["images"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    spec = BackboneSpec(args.backbone, args.pretrained, device=args.device, precision=precision)
    bs, k = args.batch_size, args.k
    procs = args.decode_procs or len(os.sched_getaffinity(0))
    threads = args.decode_threads or default_decode_threads(spec)
    mem = PeakMemory()
    peaks: dict = {}
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "backbone": spec.backbone_id, "device": args.device, "precision": precision,
                 "batch_size": bs, "k": k, "decode_procs": procs, "decode_threads": threads,
                 "images": f"{args.image_size}x{args.image_size} {args.image_format.upper()}",
                 "peaks": peaks}
    os.makedirs(args.workdir, exist_ok=True)

    count = max(args.distinct, args.e2e_n, k + 1)
    folder = os.path.join(args.workdir, f"images-{args.image_size}-{args.image_format}")
    with mp.get_context("spawn").Pool(procs) as pool:
        paths = write_images(folder, count, args.image_size, args.image_format, map_fn=pool.map)

    with Timer() as t:
        backbone = get_backbone(spec)
    res["load_s"] = t.seconds
    pre = backbone.preprocess

    pixels = [load_one(p, pre) for p in paths[:args.distinct]]
    # (c) once the files are in the page cache, on the same images each way
    res["decode_1proc_ips"] = decode_rate(paths, pre, 1)
    res["decode_threads_ips"] = decode_rate_threads(paths, pre, threads)
    res["decode_nproc_ips"] = decode_rate(paths, pre, procs)
    LOG.warning("(c) decode: %.0f img/s on 1 thread, %.0f on %d threads, %.0f on %d processes",
                res["decode_1proc_ips"], res["decode_threads_ips"], threads,
                res["decode_nproc_ips"], procs)

    batch = torch.stack(_cycle(pixels, bs)).to(backbone.device)
    batches = max(1, args.n_forward // bs)
    with mem.phase(peaks, "bare"):
        res["bare_ips"] = batches * bs / bare_forward(backbone, batch, batches)
    LOG.warning("(a) bare forward: %.0f img/s", res["bare_ips"])

    from pipeline.model.inctrl import build_text_features
    from pipeline.model.loading import build_model

    with Timer() as t:
        text = build_text_features(backbone, CATEGORY)
    res["prompt_s"] = t.seconds
    feats = backbone.encode_images(batch)
    res["score_math_ips"] = {}
    for mode, ckpt in (("training-free", None),
                       ("with heads", seeded_heads(os.path.join(args.workdir, "heads.safetensors"),
                                                   backbone.geometry, spec))):
        scorer, _ = build_model(backbone.geometry, ckpt, spec)
        scorer = scorer.to(backbone.device)
        with torch.no_grad():
            refs = scorer.prepare_references(feats[:k])
        with mem.phase(peaks, f"score_math_{mode}"):
            seconds = score_math(scorer, feats, refs, text, batches)
        res["score_math_ips"][mode] = batches * bs / seconds
    del feats, batch
    LOG.warning("(b) scoring math: %s img/s", res["score_math_ips"])

    try:
        for on_device in (False, True):
            key = "stage_on_device" if on_device else "stage"
            with mem.phase(peaks, key):
                res[f"{key}_ips"] = args.stage_n / scoring_stage(
                    spec, pixels, args.stage_n, bs, k, text, args.workdir, on_device)
            LOG.warning("(b') scoring stage%s: %.0f img/s",
                        ", features on the device" if on_device else "", res[f"{key}_ips"])
        if args.e2e_n:
            with mem.phase(peaks, "e2e"):
                res["e2e"] = end_to_end(spec, paths[:args.e2e_n], k, bs, threads, args.workdir)
            LOG.warning("(d) end to end: %s", res["e2e"])
    except ImportError as exc:  # Apache Beam missing on the machine: (a)-(c) still stand
        res["skipped"] = f"(b') and (d): {exc}"
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def report(res: dict) -> None:
    w = sys.stdout.write
    bare = res["bare_ips"]
    peaks = res["peaks"]

    def cuda(key: str) -> str:
        v = peaks.get(key + "_cuda")
        return f"{v:8.0f} MiB" if v is not None else f"{peaks.get(key, float('nan')):8.0f} MiB RSS"

    w(f"\nInCTRL GPU benchmark  ({res['date']})\nmachine:  {res['machine']}\n"
      f"command:  {res['command']}\n")
    precision = "bf16 autocast" if res["precision"] == "bf16" else res["precision"]
    w(f"workload: {res['backbone']} ({precision} on {res['device']}), batch "
      f"{res['batch_size']}, k={res['k']}, {res['images']} images; warm-up excluded\n\n")
    w(f"{'':58}{'images/s':>10}{'vs (a)':>9}{'peak mem':>14}\n")
    w(f"{'(a)  bare forward (encode_images, pixels on device)':58}{bare:10.0f}{'':9}"
      f"{cuda('bare')}\n")
    for mode, ips in res["score_math_ips"].items():
        w(f"{f'(b)  scoring math alone, {mode}':58}{ips:10.0f}{ips / bare:9.1f}x"
          f"{cuda(f'score_math_{mode}')}\n")
    stages = {"stage": "(b`) scoring stage as the pipeline runs it (no decode)",
              "stage_on_device": "(b`) same, query features kept on the device"}
    for key, label in stages.items():
        if f"{key}_ips" in res:
            ips = res[f"{key}_ips"]
            w(f"{label:58}{ips:10.0f}{ips / bare:9.0%}{cuda(key)}\n")
    w(f"{'(c)  decode + preprocess, 1 thread':58}{res['decode_1proc_ips']:10.0f}\n")
    label = f"(c)  same, {res['decode_threads']} thread(s) of 1 process (the job's)"
    w(f"{label:58}{res['decode_threads_ips']:10.0f}\n")
    label = f"(c)  same, {res['decode_procs']} processes"
    w(f"{label:58}{res['decode_nproc_ips']:10.0f}\n")
    e2e = res.get("e2e")
    if e2e:
        n = e2e["reference_forwards"] + e2e["query_forwards"]
        ips = n / e2e["seconds"]
        w(f"{'(d)  score pipeline end to end (DirectRunner, in-process)':58}{ips:10.0f}"
          f"{ips / bare:9.0%}{cuda('e2e')}\n")
    w(f"\nApart: model load {res['load_s']:.1f} s; prompt ensemble {res['prompt_s']:.2f} s.\n")
    if e2e:
        spent = e2e["seconds"] - e2e["fixed_seconds"]
        marginal = (n - e2e["fixed_images"]) / spent if spent > 0 else float("nan")
        per_image = 1e3 / marginal
        ms = {f"decode + preprocess (c, {res['decode_threads']} thread(s))":
                  1e3 / res["decode_threads_ips"],
              "backbone in the job (RunInference's timer)":
                  1e3 * e2e["query_model_s"] / max(e2e["query_forwards"], 1)}
        ms["Beam, scoring, writing and the rest"] = per_image - sum(ms.values())
        w(f"(d): {n:.0f} images in {e2e['seconds']:.1f} s, of which the job's fixed cost "
          f"(measured on {e2e['fixed_images']} images) {e2e['fixed_seconds']:.1f} s. Marginal: "
          f"{marginal:.0f} images/s = {per_image:.2f} ms per image = "
          + " + ".join(f"{v:.2f} ms {k}" for k, v in ms.items()) + ".\n")
        top = max(ms, key=ms.get)
        w(f"Bound: {top}, {ms[top] / per_image:.0%} of each image's time. The in-process runner "
          f"decodes on {res['decode_threads']} thread(s) of one process; "
          f"{res['decode_procs']} processes decode {res['decode_nproc_ips']:.0f} images/s.\n")
    stage = {k: res[f"{k}_ips"] / bare for k in stages if f"{k}_ips" in res}
    if stage:
        w("Target, scoring stage >= 70% of (a): " + ", ".join(
            f"{stages[k].split(') ', 1)[1]}: {v:.0%} ({'met' if v >= 0.7 else 'NOT met'})"
            for k, v in stage.items()) + f"; scoring math alone "
          f"{min(res['score_math_ips'].values()) / bare:.1f}x (a).\n")
    if "skipped" in res:
        w(f"Skipped {res['skipped']}\n")


if __name__ == "__main__":
    sys.exit(main())
