"""Scores before and after a performance change must agree: score the demo set, compare.

    python -m bench.check_scores save BASE_DIR      # on the code before the change
    python -m bench.check_scores compare BASE_DIR   # on the code after it

Scores the embedded demo set with the tiny test backbone, three seeds, patch maps on: InCTRL
training-free, InCTRL with seeded heads, and every scorer in one run (SPADE, PaDiM and
PatchCore on a seeded random MobileNetV2, AnomalyDINO on a seeded random DINOv2 ViT-S/14 at
112 px); compares every score column (and the patch maps) row by row, rows keyed by
(image_id, seed, scorer). Exits 1 when a value differs by more than ``--atol`` (default
1e-6; float32 results move in the last bits with the batch composition, so compare at the
same ``--batch-size``; a pure refactor must give 0).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import pandas as pd

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.checkpoint import HeadsMetadata, save_heads
from pipeline.model.heads import InCTRLHeads
from pipeline.run import run_score

LOG = logging.getLogger("bench.check_scores")

SCORE_COLUMNS = ("final_score", "fine_score", "holistic_score", "image_residual_score",
                 "text_prior_score")
MODES = ("training-free", "heads", "all-scorers")
ALL_SCORERS = ("inctrl", "spade", "padim", "patchcore", "winclip", "anomalydino")
#: The comparison scorers' models in the all-scorers run: seeded random weights, small input.
MODELS = dict(cnn_backbone="mobilenet_v2", cnn_weights="random:0",
              vit_backbone="vit_small_patch14_dinov2", vit_weights="random:0", vit_image_size=112)


def score_demo(workdir: str, batch_size: int,
               modes: tuple[str, ...] = MODES) -> dict[str, pd.DataFrame]:
    """Scores of the demo set per mode, sorted by (image_id, seed, scorer)."""
    # Image ids hash the image URIs, and the reference draw hashes the ids: keep the folder fixed.
    data = os.path.join(workdir, "data")
    manifest = os.path.join(workdir, "manifest.parquet")
    write_manifest(make_manifest(generate_demo(data, seed=0)), manifest)
    spec = tiny_spec()
    geometry = get_backbone(spec).geometry
    heads_path = os.path.join(workdir, "heads.safetensors")
    save_heads(InCTRLHeads.seeded(geometry.embed_dim, geometry.num_patches, seed=3).eval(),
               heads_path, HeadsMetadata(spec.name, spec.pretrained, geometry.blocks,
                                         geometry.image_size, geometry.embed_dim,
                                         geometry.num_patches, k=4))
    out = {}
    for mode in modes:
        output = os.path.join(workdir, mode)
        shutil.rmtree(output, ignore_errors=True)
        run_score(config_for(mode, manifest, output, spec, heads_path, batch_size), [])
        files = sorted(glob.glob(f"{output}/scores/**/*.parquet", recursive=True))
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        out[mode] = frame.sort_values(["image_id", "seed", "scorer"]).reset_index(drop=True)
    return out


def config_for(mode: str, manifest: str, output: str, spec, heads: str,
               batch_size: int) -> ScoreConfig:
    """The run of one mode (the same settings before and after a change)."""
    common = dict(manifest=manifest, output=output, k=4, seeds=(0, 1, 2), backbone=spec,
                  batch_size=batch_size, write_patch_map=True, run_id="check",
                  run_date="2024-01-01")
    if mode == "training-free":
        return ScoreConfig(**common)
    if mode == "heads":
        return ScoreConfig(**common, checkpoint=heads)
    return ScoreConfig(**common, scorers=ALL_SCORERS, options=MODELS)


def compare(base: pd.DataFrame, new: pd.DataFrame) -> dict[str, float]:
    """Largest absolute difference per score column (and over patch maps); NaN must match NaN."""
    keys = ["image_id", "seed", "scorer"]
    if len(base) != len(new) or not base[keys].equals(new[keys]):
        raise AssertionError(f"different rows: {len(base)} before, {len(new)} after")
    diffs = {}
    for col in SCORE_COLUMNS:
        a, b = base[col].to_numpy(float), new[col].to_numpy(float)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            raise AssertionError(f"{col}: NaN in different rows")
        both = ~np.isnan(a)
        diffs[col] = float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
    worst = 0.0
    for a, b in zip(base["patch_map"], new["patch_map"]):  # scorers' grids differ
        if (a is None) != (b is None):
            raise AssertionError("patch_map: null in different rows")
        if a is not None:
            a, b = np.asarray(a, float), np.asarray(b, float)
            if a.shape != b.shape:
                raise AssertionError(f"patch_map: shapes {a.shape} and {b.shape}")
            worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
    diffs["patch_map"] = worst
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.check_scores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "compare"))
    parser.add_argument("base_dir", help="where 'save' writes and 'compare' reads the baseline")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-check"),
                        help="fixed folder for the demo data (image ids depend on its path)")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes {', '.join(MODES)}")
    logging.basicConfig(level=logging.WARNING)
    scores = score_demo(args.workdir, args.batch_size, modes)
    if args.action == "save":
        os.makedirs(args.base_dir, exist_ok=True)
        for mode, frame in scores.items():
            frame.to_parquet(os.path.join(args.base_dir, f"{mode}.parquet"))
        print(f"saved {', '.join(f'{m}: {len(f)} rows' for m, f in scores.items())} "
              f"to {args.base_dir}")
        return 0
    worst = 0.0
    for mode, frame in scores.items():
        diffs = compare(pd.read_parquet(os.path.join(args.base_dir, f"{mode}.parquet")), frame)
        worst = max(worst, *diffs.values())
        print(f"{mode:>14} ({len(frame)} rows): max |after - before| "
              + ", ".join(f"{k}={v:.3g}" for k, v in diffs.items()))
    ok = worst <= args.atol
    print(f"{'OK' if ok else 'FAIL'}: largest difference {worst:.3g} (tolerance {args.atol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
