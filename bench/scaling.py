"""Cost scaling of the score job: time linear in queries, reference work per group, flat memory.

    python -m bench.scaling                    # tiny test backbone, 64 px PNGs, ~3 minutes
    python -m bench.scaling --queries 2000 --rows 500 --threads 1

Every run is a fresh process (``--child``) scoring a one-category manifest on the
DirectRunner; it loads the model before the clock starts and reports its wall time, its
peak RSS (``ru_maxrss``) and the job's Beam counters.
  * linearity: Q, 2Q and 4Q queries against the same k references (each the fastest of
    --repeats runs); a line T = fixed + per-query x Q should fit all three, and reference
    forwards, reference sets prepared and prompt sets encoded should not move with Q;
  * groups: G categories interleaved in the manifest (more than a worker's cache of prepared
    reference sets), with q and then 2q queries each: reference forwards should stay G x k
    and reference sets prepared G;
  * memory: N and 10 N rows (distinct small images); the peak RSS ratio should stay under
    1.3. The tiny backbone keeps 10 N rows fast; its features are ~50 KB per image, so the
    per-row slope is also printed: a job that held every row's features would show it.
  * lines (``--checks lines``): the same --line-queries queries split over each count of
    --lines product lines (datasets of one category, k references each, interleaved): a
    worker's peak RSS should not grow with the lines (target: 1,000 lines within 1.25x of
    10), the most groups' reference sets a scoring worker held at once (the
    ``reference_sets_held`` metric) should stay within its cache of prepared memories, and
    wall time should follow the images forwarded. Give it a backbone whose features are
    large, e.g. ``--backbone ViT-B-32 --pretrained random:0`` (~600 KB per image):

    python -m bench.scaling --checks lines --backbone ViT-B-32 --pretrained random:0 \\
        --lines 1,10,100,1000 --line-queries 1000 --k 4 [--shared-references]

    With --shared-references every line's references are the same k images (same ids):
    k reference forwards in all instead of k per line, while each line still builds and
    holds its own memory; for machines too slow to forward 4,000 reference images.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.data import interleaved_manifest, lines_manifest, one_group_manifest, write_images
from bench.measure import (Timer, beam_metrics, command_line, machine, max_rss_mib, today,
                           work_summary)

LOG = logging.getLogger("bench.scaling")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000, help="Q: runs with Q, 2Q and 4Q queries")
    p.add_argument("--repeats", type=int, default=2, help="runs per point of the linearity check")
    p.add_argument("--rows", type=int, default=200, help="N: runs with N and 10 N rows")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backbone", default="InCTRL-Tiny-ViT-TESTONLY")
    p.add_argument("--pretrained", default="random:0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-scaling"))
    p.add_argument("--groups", type=int, default=70, help="G: categories of the groups check")
    p.add_argument("--group-queries", type=int, default=5, help="q: queries per category")
    p.add_argument("--lines", default="1,10,100,1000",
                   help="product-line counts of the lines check")
    p.add_argument("--line-queries", type=int, default=1000,
                   help="queries of every run of the lines check, split over the lines")
    p.add_argument("--shared-references", action="store_true",
                   help="lines check: every line's k references are the same k images (one "
                        "forward each for all lines; each line still builds its own memory)")
    p.add_argument("--checks", default="linear,groups,memory",
                   help="which checks to run (linear, groups, memory, lines)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # manifest of one run
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> int:
    """One run in this fresh process; prints one JSON line."""
    import torch

    from pipeline.core.config import ScoreConfig
    from pipeline.model.backbone import BackboneSpec, get_backbone
    from pipeline.run import run_score

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = BackboneSpec(args.backbone, args.pretrained)
    get_backbone(spec)
    output = args.child + ".out"
    config = ScoreConfig(manifest=args.child, output=output, k=args.k, seeds=(0,),
                         backbone=spec, batch_size=args.batch_size, run_id="scaling",
                         run_date="2000-01-01")
    cpu = time.process_time()
    with Timer() as t:
        result = run_score(config, [])
    cpu = time.process_time() - cpu  # every thread of this process: what the work cost
    shutil.rmtree(output, ignore_errors=True)
    print(json.dumps({"seconds": t.seconds, "cpu_seconds": cpu, "peak_rss_mib": max_rss_mib(),
                      **work_summary(beam_metrics(result))}))
    return 0


def run_child(args: argparse.Namespace, manifest: str) -> dict:
    cmd = [sys.executable, "-m", "bench.scaling", "--child", manifest, "--k", str(args.k),
           "--batch-size", str(args.batch_size), "--backbone", args.backbone,
           "--pretrained", args.pretrained, "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    LOG.warning("%s: %.1f s, %.0f MiB", os.path.basename(manifest), out["seconds"],
                out["peak_rss_mib"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        return child(args)
    q, n, k = args.queries, args.rows, args.k
    if args.threads:  # as in the children, so the machine line says what they ran with
        import torch

        torch.set_num_threads(args.threads)
    os.makedirs(args.workdir, exist_ok=True)
    checks = set(args.checks.split(","))
    plan = [("Q", q), ("2Q", 2 * q), ("4Q", 4 * q)] if "linear" in checks else []
    plan += [("N", n - k), ("10N", 10 * n - k)] if "memory" in checks else []
    g, gq = args.groups, args.group_queries
    plan += [("G,q", g * gq), ("G,2q", g * 2 * gq)] if "groups" in checks else []
    lines = [int(x) for x in args.lines.split(",")] if "lines" in checks else []
    plan += [(f"L{n}", args.line_queries) for n in lines]
    images = max([queries + k for _, queries in plan] + [g * (k + 2 * gq) if "groups" in checks
                                                         else 0]
                 + [(1 if args.shared_references else n) * k + args.line_queries
                    for n in lines])
    paths = write_images(os.path.join(args.workdir, f"images-{args.image_size}"), images,
                         args.image_size, "png")
    runs: dict[str, dict] = {}
    for label, queries in plan:
        if label.startswith("L"):
            n = int(label[1:])
            manifest = os.path.join(args.workdir, f"manifest-{n}-lines-{queries}.parquet")
            shared = args.shared_references
            manifest = manifest.replace(".parquet", "-shared.parquet" if shared else ".parquet")
            lines_manifest(paths, n, k, queries, manifest, shared_references=shared)
        elif label.startswith("G"):
            manifest = os.path.join(args.workdir, f"manifest-{g}-groups-{queries}.parquet")
            interleaved_manifest(paths, g, k, queries // g, manifest)
        else:
            manifest = os.path.join(args.workdir, f"manifest-{queries + k}.parquet")
            one_group_manifest(paths[:queries + k], k, manifest)
        tries = [run_child(args, manifest)
                 for _ in range(args.repeats if label in ("Q", "2Q", "4Q") else 1)]
        runs[label] = min(tries, key=lambda r: r["seconds"])
    res = {"date": today(), "machine": machine(), "command": command_line(),
           "backbone": f"{args.backbone}@{args.pretrained}", "k": k, "queries": q, "rows": n,
           "groups": g, "group_queries": gq, "lines": lines, "line_queries": args.line_queries,
           "shared_references": args.shared_references,
           "batch_size": args.batch_size, "image_size": args.image_size, "runs": runs}
    report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def report(res: dict) -> None:
    w = sys.stdout.write
    runs, q, n, k = res["runs"], res["queries"], res["rows"], res["k"]
    w(f"\nInCTRL scoring cost scaling  ({res['date']})\nmachine:  {res['machine']}\n"
      f"command:  {res['command']}\n")
    w(f"workload: {res['backbone']}, one category (G runs: {res['groups']}), k={k}, "
      f"batch {res['batch_size']}, "
      f"{res['image_size']} px PNG; each run a fresh process, model loaded before the clock\n\n")
    w(f"{'run':6}{'queries':>8}{'seconds':>9}{'ref fwd':>9}{'query fwd':>10}{'ref sets':>9}"
      f"{'prompts':>8}{'ref model s':>12}{'peak RSS MiB':>14}\n")
    for label, r in runs.items():
        w(f"{label:6}{r['queries_scored']:8.0f}{r['seconds']:9.2f}{r['reference_forwards']:9.0f}"
          f"{r['query_forwards']:10.0f}{r['reference_sets_prepared']:9.0f}"
          f"{r['prompt_sets_encoded']:8.0f}{r['reference_model_s']:12.3f}"
          f"{r['peak_rss_mib']:14.0f}\n")
    if "Q" in runs:
        linearity(runs, w)
    if "G,q" in runs:
        groups(runs, res["groups"], k, w)
    if "N" in runs:
        memory(runs, n, w)
    if res.get("lines"):
        product_lines(runs, res["lines"], w, res.get("shared_references", False))


def linearity(runs: dict, w) -> None:
    xs = [runs[x]["queries_scored"] for x in ("Q", "2Q", "4Q")]
    ts = [runs[x]["seconds"] for x in ("Q", "2Q", "4Q")]
    mx, mt = sum(xs) / 3, sum(ts) / 3
    per_query = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sum((x - mx) ** 2 for x in xs)
    fixed = mt - per_query * mx
    worst = max(abs(fixed + per_query * x - t) / t for x, t in zip(xs, ts))
    w(f"\nLinear in queries: T = {fixed:.2f} s + {1e3 * per_query:.2f} ms x queries fits Q, 2Q, "
      f"4Q within {worst:.1%}; T(2Q)/T(Q) = {ts[1] / ts[0]:.2f} with the fixed cost, "
      f"{(ts[1] - fixed) / (ts[0] - fixed):.2f} without, T(4Q)/T(2Q) = "
      f"{(ts[2] - fixed) / (ts[1] - fixed):.2f} without.\n")
    refs = {runs[x]["reference_forwards"] for x in ("Q", "2Q", "4Q")}
    sets = {runs[x]["reference_sets_prepared"] for x in ("Q", "2Q", "4Q")}
    w(f"Reference work per group: reference forwards {sorted(refs)}, reference sets prepared "
      f"{sorted(sets)} at Q, 2Q and 4Q ({'constant' if len(refs) == len(sets) == 1 else 'NOT constant'}"
      ").\n")


def groups(runs: dict, g: int, k: int, w) -> None:
    refs = [runs[x]["reference_forwards"] for x in ("G,q", "G,2q")]
    sets = [runs[x]["reference_sets_prepared"] for x in ("G,q", "G,2q")]
    ok = refs == [g * k] * 2 and sets == [g] * 2
    w(f"Reference work per group, {g} categories interleaved in the manifest: reference "
      f"forwards {refs[0]:.0f} and {refs[1]:.0f} (G x k = {g * k}), sets prepared {sets[0]:.0f} "
      f"and {sets[1]:.0f} (G = {g}) with q and 2q queries per category "
      f"({'once per group' if ok else 'NOT once per group'}).\n")


def memory(runs: dict, n: int, w) -> None:
    r1, r10 = runs["N"], runs["10N"]
    ratio = r10["peak_rss_mib"] / r1["peak_rss_mib"]
    slope = 1024 * (r10["peak_rss_mib"] - r1["peak_rss_mib"]) / (9 * n)
    w(f"Memory: {n} rows {r1['peak_rss_mib']:.0f} MiB, {10 * n} rows {r10['peak_rss_mib']:.0f} MiB"
      f": ratio {ratio:.2f} ({'under' if ratio < 1.3 else 'NOT under'} 1.3), {slope:.1f} KiB per "
      "extra row.\n")


def product_lines(runs: dict, lines: list[int], w, shared: bool = False) -> None:
    """Peak RSS, reference sets held and wall time against the number of product lines."""
    from transforms.score import _PREPARED_CACHE

    w("\nProduct lines: the same queries split over each number of lines (datasets of one "
      f"category); {'the same' if shared else 'its own'} k references for every line.\n")
    w(f"{'lines':>6}{'queries':>8}{'ref fwd':>9}{'query fwd':>10}{'seconds':>9}"
      f"{'s/image':>9}{'CPU s':>9}{'CPU s/image':>12}{'peak RSS MiB':>14}{'sets held':>10}\n")
    for n in lines:
        r = runs[f"L{n}"]
        images = r["reference_forwards"] + r["query_forwards"]
        cpu = r.get("cpu_seconds", float("nan"))
        w(f"{n:6d}{r['queries_scored']:8.0f}{r['reference_forwards']:9.0f}"
          f"{r['query_forwards']:10.0f}{r['seconds']:9.1f}{r['seconds'] / images:9.3f}"
          f"{cpu:9.1f}{cpu / images:12.3f}"
          f"{r['peak_rss_mib']:14.0f}{r['reference_sets_held']:10.0f}\n")
    if 10 in lines and 1000 in lines:
        ratio = runs["L1000"]["peak_rss_mib"] / runs["L10"]["peak_rss_mib"]
        w(f"Peak RSS at 1,000 lines / at 10 lines: {ratio:.2f} "
          f"({'within' if ratio <= 1.25 else 'NOT within'} the 1.25x target).\n")
    held = max(runs[f"L{n}"]["reference_sets_held"] for n in lines)
    w(f"Reference sets held by a scoring worker: at most {held:.0f} (its cache: "
      f"{_PREPARED_CACHE} groups; {'bounded' if held <= _PREPARED_CACHE else 'NOT bounded'}).\n")
    xs = [runs[f"L{n}"]["reference_forwards"] + runs[f"L{n}"]["query_forwards"] for n in lines]
    for what, key in (("Wall time", "seconds"), ("CPU time", "cpu_seconds")):
        ts = [runs[f"L{n}"].get(key) for n in lines]
        if None in ts:
            continue
        if len(set(xs)) > 1:
            mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
            slope = (sum((x - mx) * (t - mt) for x, t in zip(xs, ts))
                     / sum((x - mx) ** 2 for x in xs))
            fixed = mt - slope * mx
            worst = max(abs(fixed + slope * x - t) / t for x, t in zip(xs, ts))
            w(f"{what} against images forwarded: T = {fixed:.1f} s + {1e3 * slope:.1f} ms x "
              f"images fits every line count within {worst:.1%}.\n")
        else:  # the same images forwarded at every line count: time should not move
            w(f"{what} at {xs[0]} images forwarded for every line count: largest / smallest "
              f"= {max(ts) / min(ts):.2f}.\n")


if __name__ == "__main__":
    sys.exit(main())
