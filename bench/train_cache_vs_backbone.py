"""One-off measurement: per-epoch training time from the feature cache vs backbone in the loop.

Both modes train the same heads on the same demo data with the same seeded batches and prompts;
they differ only in where a step's features come from:

- cache:    FeatureCache reads (what ``python -m pipeline train`` does)
- backbone: every step reads, decodes and preprocesses its query and prompt images and runs the
            frozen backbone on them (batch_size * (1 + k) images per step)

Per-epoch time = mean step time (after warm-up) x --steps-per-epoch. The one-off extraction
into the cache is timed as well. Not a test; prints a small table.

    python bench/train_cache_vs_backbone.py                 # tiny test backbone
    python bench/train_cache_vs_backbone.py --full          # ViT-B-16-plus-240, random weights
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core.demo_data import generate_demo  # noqa: E402
from pipeline.core.feature_cache import FeatureCache  # noqa: E402
from pipeline.core.images import decode_image, read_bytes  # noqa: E402
from pipeline.core.make_manifest import make_manifest  # noqa: E402
from pipeline.core.manifest import write_manifest  # noqa: E402
from pipeline.extract_job import extract_manifests  # noqa: E402
from pipeline.model.backbone import (DEFAULT_BACKBONE, BackboneSpec, ClipBackbone,  # noqa: E402
                                     ImageFeatures, get_backbone, tiny_spec)
from pipeline.model.heads import InCTRLHeads  # noqa: E402
from pipeline.model.inctrl import InCTRLModel, build_text_features  # noqa: E402
from pipeline.train.data import (Episode, EpisodeSampler, FeatureStore, TrainingSet,  # noqa: E402
                                 read_index)
from pipeline.train.loop import CachedBatches, LoopSettings, fit  # noqa: E402


def _stack(backbone, images):
    """Images through the backbone's own transform, stacked: (n, 3, H, W)."""
    return torch.stack([backbone.preprocess(im) for im in images])

LOG = logging.getLogger("bench")


@dataclass
class BackboneBatches:
    """Features computed from the images at every step, as training without a cache would."""

    backbone: ClipBackbone
    data: TrainingSet
    encode_seconds: float = 0.0

    def __call__(self, episodes: Sequence[Episode]):
        uris = self.data.index["image_uri"].tolist()
        positions = [e.query for e in episodes] + [p for e in episodes for p in e.prompts]
        pixels = _stack(self.backbone, [decode_image(read_bytes(uris[p])) for p in positions])
        t0 = time.perf_counter()
        feats = self.backbone.encode_images(pixels)
        self.encode_seconds += time.perf_counter() - t0
        n = len(episodes)
        queries, prompts, start = feats[:n], [], n
        for e in episodes:
            prompts.append(ImageFeatures(feats.tokens[start:start + len(e.prompts)],
                                         feats.embeds[start:start + len(e.prompts)]))
            start += len(e.prompts)
        labels = torch.tensor([e.label for e in episodes], dtype=torch.float32,
                              device=feats.tokens.device)
        return queries, prompts, labels


def _step_times(data: TrainingSet, batches, text, geometry, device, steps: int,
                batch_size: int) -> list[float]:
    """Seconds of each of ``steps`` training steps (same seeds, so same batches, in each mode)."""
    heads = InCTRLHeads.seeded(geometry.embed_dim, geometry.num_patches, 0)
    scorer = InCTRLModel(geometry, heads).to(device)
    sampler = EpisodeSampler(data, batch_size, seed=0)
    result = fit(scorer, sampler, batches, text, LoopSettings(1, steps, log_every=10**9))
    return [s["step_time_s"] for s in result.log.steps]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help=f"{DEFAULT_BACKBONE} with random weights instead of the tiny backbone")
    parser.add_argument("--cache-steps", type=int, default=50, help="timed steps, cache mode")
    parser.add_argument("--backbone-steps", type=int, default=None,
                        help="timed steps, backbone mode (default: 20, or 3 with --full)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per mode")
    parser.add_argument("--steps-per-epoch", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone_steps = args.backbone_steps or (3 if args.full else 20)
    spec = (BackboneSpec(DEFAULT_BACKBONE, "random:0", device=args.device) if args.full
            else tiny_spec(args.device))

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    try:
        manifest = os.path.join(workdir, "manifest.parquet")
        write_manifest(make_manifest(generate_demo(os.path.join(workdir, "data"))), manifest)
        backbone = get_backbone(spec)  # loaded before timing: both modes need it
        cache_root = os.path.join(workdir, "cache")
        shutil.rmtree(cache_root, ignore_errors=True)
        t0 = time.perf_counter()
        report = extract_manifests({"train": manifest}, cache_root, os.path.join(workdir, "index"),
                                   spec, batch_size=32)
        extract_s = time.perf_counter() - t0

        data = TrainingSet(read_index(report.index["train"]), args.k)
        text = {c: build_text_features(backbone, c).cpu() for c in data.categories}
        geo, device = backbone.geometry, backbone.device
        store = FeatureStore(FeatureCache(cache_root, spec))
        cache_times = _step_times(data, CachedBatches(store, data, device), text, geo, device,
                                  args.warmup + args.cache_steps, args.batch_size)[args.warmup:]
        in_loop = BackboneBatches(backbone, data)
        all_loop_times = _step_times(data, in_loop, text, geo, device,
                                     args.warmup + backbone_steps, args.batch_size)
        loop_times = all_loop_times[args.warmup:]
        encode_share = in_loop.encode_seconds / sum(all_loop_times)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    per_step = {"cache": statistics.mean(cache_times), "backbone": statistics.mean(loop_times)}
    images = sum(report.indexed.values())
    out = sys.stdout
    out.write(f"date: {dt.datetime.now().isoformat(timespec='seconds')}\n"
              f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads "
              f"{torch.get_num_threads()}, device {device}\n"
              f"command: {' '.join([sys.executable, *sys.argv])}\n"
              f"backbone: {spec.backbone_id} {geo}\n"
              f"data: pipeline.core.demo_data, {images} images; batch {args.batch_size}, k {args.k} "
              f"({args.batch_size * (1 + args.k)} images per step)\n"
              f"one-off extraction into the cache: {extract_s:.1f} s "
              f"({report.cache_misses} images)\n\n")
    out.write(f"{'mode':<10}{'timed steps':>12}{'s/step':>10}{'s/epoch':>10}"
              f"  (epoch = {args.steps_per_epoch} steps)\n")
    for mode, times in (("cache", cache_times), ("backbone", loop_times)):
        out.write(f"{mode:<10}{len(times):>12}{per_step[mode]:>10.4f}"
                  f"{per_step[mode] * args.steps_per_epoch:>10.1f}\n")
    out.write(f"\nbackbone-in-the-loop / cache: {per_step['backbone'] / per_step['cache']:.1f}x "
              f"per epoch; backbone forward = {100 * encode_share:.0f}% of an in-loop step\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
