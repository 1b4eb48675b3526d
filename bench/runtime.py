"""Speed of each precision and runtime on the CPU: every extractor alone and the whole job.

    python -m bench.runtime                              # every part, the defaults below
    python -m bench.runtime --parts extractors --rounds 3 --json /tmp/runtime.json

It prints this CPU's bf16 capabilities (the /proc/cpuinfo flags the job reads, torch's CPU
capability, whether oneDNN has bf16), then, in one process and on the same inputs:

  extractors  images/s of each extractor's forward alone, as the job loads it
              (``ExtractorEntry.load``, random weights: the same FLOPs as trained ones), on a
              batch of preprocessed pixels already in memory: the CLIP image tower InCTRL
              and CoOp read (ViT-B-16-plus-240, ``encode_images``), WinCLIP's windows on it,
              the CNN stages (mobilenet_v2 to features.13, wide_resnet50_2 to layer3, the
              papers' three strides), DINOv2 ViT-S/14 at 448 px and RegAD's network
              (resnet18 with its STNs, untrained). Variants: ``fp32``, ``bf16`` (the job's
              ``--precision bf16``: the module's weights and input in bf16, channels-last
              for the CNNs), ``fp32-cl`` and ``bf16-nchw`` (CNNs only, the other memory
              format: not what the job runs, measured to decide) and ``autocast`` (CLIP
              only: fp32 weights under ``torch.autocast("cpu", bfloat16)``, what
              ``--precision bf16`` did before), and, where the ``openvino`` package is
              importable, ``ov-fp32`` and ``ov-bf16``: the same forward compiled by
              OpenVINO (``pipeline.model.compiled``) at that precision, in the same rounds.
              The CNNs run as the job runs ``--cnn-runtime openvino`` (``CnnExtractor`` with
              ``runtime="openvino"``); the CLIP tower (``forward_intermediates`` at the
              backbone's blocks, what ``encode_images`` runs) and DINOv2
              (``forward_features``) through ``CompiledModule``, which the job does not
              offer for them: measured to show where OpenVINO does not beat torch.
              WinCLIP's windows and RegAD have no OpenVINO variant. Per OpenVINO row it
              also prints the load seconds: the torch extractor's, the first OpenVINO load
              (convert, compile, write the cache entry) and a cached one (a second load
              from the same, fresh cache directory under ``--workdir``). Without
              ``openvino`` the columns are absent and one log line says why.
  jobs        images/s of the whole ``score`` job (DirectRunner, in this process, training-
              free, one category of k references and N - k queries) for InCTRL alone, for
              the six scorers that need no trained file together and for the CNN scorers
              (SPADE, PaDiM, PatchCore: ``--jobs cnn``), in fp32 and bf16, and for the six
              and the CNN scorers also ``fp32+ov`` and ``bf16+ov``: the CNN scorers' extractor
              under OpenVINO (``cnn_runtime=openvino``; CLIP and DINO stay on torch) where
              ``openvino`` is importable;
              and the same on k + 1 images, whose difference gives the marginal rate
              (images/s a long run approaches: the run's fixed costs, the prompt ensemble
              and reference memories, taken out). Models stay loaded between runs, as on a
              worker; a first, untimed run per precision loads them and encodes the
              category's prompt ensemble, which later runs in the process reuse (as the
              nightly's runs do, and its feature cache across processes); with
              ``--encode-prompts`` every timed run encodes it again, as a process's first
              run does (the text tower in fp32: about 2 CPU-seconds a category). Beside
              the InCTRL job, in the same rounds, the bare image tower it runs (its
              ``encode_images`` on as many preprocessed images as the marginal counts), so
              that the marginal / bare ratio comes from one run; and the tower's share of
              the job's marginal wall time, timed inside the job's own runs
              (``TowerClock``), which the host's speed between measurements cannot move.

The machine is shared: every measurement is repeated ``--rounds`` times with the variants
interleaved within each round (fp32, bf16, ... then again), so that load from other jobs
hits every variant alike, and the median is reported with the 1-minute load average. Each
measurement gives images per wall-clock second and images per CPU-second of this process
(``time.process_time``, all its threads): on a busy machine the wall clock mostly measures
the other jobs, while CPU time is what the work itself costs.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

from bench.data import one_group_manifest, write_images
from bench.measure import Timer, command_line, machine, today
from bench.quality import load_average
from pipeline.core.config import ScoreConfig
from pipeline.model.backbone import BackboneSpec, get_backbone
from pipeline.model.compiled import OPENVINO, TORCH, CompiledModule
from pipeline.model.precision import BF16, FP32, cpu_bf16, to_input, to_precision
from pipeline.model.scorers.cnn import CnnSpec, CnnExtractor
from pipeline.model.scorers.dino import DinoExtractor, DinoSpec
from pipeline.model.scorers.regad import RegadExtractor, RegadModel, RegadSpec
from pipeline.model.scorers.winclip import WinClipExtractor
from pipeline.model.shared import clear
from pipeline.run import run_score
from transforms.prompts import PROMPT_PAIRS

LOG = logging.getLogger("bench.runtime")

CLIP_BACKBONE = "ViT-B-16-plus-240"
#: the six scorers a run can compare without a trained file
TRAINING_FREE = ("inctrl", "spade", "padim", "patchcore", "winclip", "anomalydino")
CNN_SCORERS = ("spade", "padim", "patchcore")
PARTS = ("extractors", "jobs")
JOBS = ("inctrl", "six", "cnn")
#: the OpenVINO variants of the extractors and their precision
OV_VARIANTS = {"ov-fp32": FP32, "ov-bf16": BF16}
#: the variants of the jobs: (precision, the CNN extractor's runtime)
JOB_VARIANTS = {FP32: (FP32, TORCH), BF16: (BF16, TORCH),
                "fp32+ov": (FP32, OPENVINO), "bf16+ov": (BF16, OPENVINO)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="extractors, jobs")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians")
    p.add_argument("--job-rounds", type=int, default=0,
                   help="rounds of the six-scorer job (0: --rounds)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward and job batch")
    p.add_argument("--n", type=int, default=16, help="images per extractor measurement")
    p.add_argument("--n-slow", type=int, default=2,
                   help="images per measurement of the slow variants: WinCLIP's windows (about "
                        "ten tower forwards an image) and CLIP under autocast")
    p.add_argument("--jobs", default="inctrl,six",
                   help="which jobs: inctrl (InCTRL alone), six (the six scorers), cnn "
                        "(SPADE, PaDiM and PatchCore: the CNN scorers)")
    p.add_argument("--job-n", type=int, default=24, help="images of the InCTRL job")
    p.add_argument("--suite-n", type=int, default=12, help="images of the six-scorer job")
    p.add_argument("--cnn-n", type=int, default=48, help="images of the CNN scorers' job")
    p.add_argument("--k", type=int, default=4, help="references of the jobs")
    p.add_argument("--encode-prompts", action="store_true",
                   help="every timed job run encodes the prompt ensemble (a process's first "
                        "run) instead of reusing the process's")
    p.add_argument("--image-format", default="png", choices=("png", "jpg"),
                   help="the jobs' 256 px input files (their noise PNGs decode about 7x "
                        "slower than the JPEGs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inctrl-runtime"))
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.parts = tuple(s.strip() for s in args.parts.split(",") if s.strip())
    if not args.parts or any(s not in PARTS for s in args.parts):
        p.error(f"--parts takes {', '.join(PARTS)}")
    if args.rounds < 1 or args.n < 1 or args.n_slow < 1 or args.job_rounds < 0:
        p.error("--rounds, --n and --n-slow must be positive")
    args.jobs = tuple(s.strip() for s in args.jobs.split(",") if s.strip())
    if not args.jobs or any(j not in JOBS for j in args.jobs):
        p.error(f"--jobs takes {', '.join(JOBS)}")
    if min(args.job_n, args.suite_n, args.cnn_n) <= args.k + 1:
        p.error("--job-n, --suite-n and --cnn-n must exceed k + 1 (the marginal rate needs "
                "both runs)")
    return args


def capabilities() -> dict[str, Any]:
    """What this CPU offers for bf16, as the job sees it."""
    found = cpu_bf16()
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return {"native_bf16": found.native, "flags": list(found.flags),
            "torch_cpu_capability": found.capability,
            "onednn_bf16": bool(mkldnn_bf16()) if mkldnn_bf16 else None,
            "describe": found.describe()}


def openvino_version() -> tuple[str | None, str | None]:
    """(OpenVINO's version, None), or (None, why the OpenVINO variants cannot run here)."""
    try:
        import openvino
    except ImportError as exc:
        return None, f"openvino is not importable ({exc})"
    return openvino.get_version(), None


def interleaved(variants: dict[str, Callable[[], tuple[float, float]]],
                rounds: int) -> dict[str, dict]:
    """Run every variant once per round, in turn; each returns (images per wall second,
    images per CPU-second). Medians of both, all values and the load average seen."""
    values: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    loads = []
    for r in range(rounds):
        for name, fn in variants.items():
            loads.append(load_average())
            values[name].append(fn())
            LOG.warning("round %d %s: %.2f img/s, %.2f img/CPU-s", r + 1, name,
                        *values[name][-1])
    return {name: {"ips": statistics.median(w for w, _ in v),
                   "cpu_ips": statistics.median(c for _, c in v), "all": v,
                   "load": statistics.median(loads)} for name, v in values.items()}


def timed(fn: Callable[[], Any], images: int) -> tuple[float, float]:
    """(images per wall second, images per CPU-second of this process) of ``fn()``."""
    cpu = time.process_time()
    with Timer() as t:
        fn()
    return images / t.seconds, images / (time.process_time() - cpu)


def rate(forward: Callable[[torch.Tensor], Any], pixels: torch.Tensor,
         batch: int) -> tuple[float, float]:
    """``timed`` of ``forward`` over ``pixels`` in batches of ``batch``."""
    def run() -> None:
        with torch.no_grad():
            for i in range(0, pixels.shape[0], batch):
                forward(pixels[i:i + batch])

    return timed(run, pixels.shape[0])


def pixels_for(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) normalised-looking pixels, the same for every variant."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g)


# --------------------------------------------------------------- extractors alone


class _ClipTower(torch.nn.Module):
    """The CLIP image tower as ``encode_images`` runs it, returning a dict (what
    ``CompiledModule`` takes): tokens (B, layers, patches, width) at the backbone's blocks and
    the image embedding (B, embed_dim)."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.visual = backbone.model.visual
        self.indices = [b - 1 for b in backbone.geometry.blocks]

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.visual.forward_intermediates(pixels, indices=self.indices,
                                                output_fmt="NLC",
                                                normalize_intermediates=False)
        return {"tokens": torch.stack(out["image_intermediates"], dim=1),
                "embeds": out["image_features"]}


class _DinoTokens(torch.nn.Module):
    """DINOv2's ``forward_features`` (B, prefix + patches, width) as a dict."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.model.forward_features(pixels)}


def _loaded(load: Callable[[], Any]) -> tuple[Any, float]:
    """``load()`` and its seconds."""
    with Timer() as t:
        value = load()
    return value, t.seconds


def _ov_loads(build: Callable[[str], Any], source: Callable[[Any], str], name: str,
              torch_seconds: float, loads: dict) -> dict[str, Any]:
    """Per OpenVINO variant, the compiled forward of ``build(precision)`` (into a fresh
    cache directory): built twice, the first load converting, compiling and writing the
    cache entry, the second reading it; both loads' seconds go to ``loads[name]``, and the
    second, cached instance is the one measured."""
    loads[name] = {"torch_s": torch_seconds}
    out = {}
    for variant, precision in OV_VARIANTS.items():
        first, first_s = _loaded(lambda: build(precision))
        cached, cached_s = _loaded(lambda: build(precision))
        if (source(first), source(cached)) != ("built", "cache"):
            raise RuntimeError(f"{name} {variant}: expected a built then a cached load, got "
                               f"{source(first)!r} then {source(cached)!r}")
        del first  # not measured: one compiled model per variant in memory
        loads[name][variant] = {"first_s": first_s, "cached_s": cached_s}
        LOG.warning("%s %s: first load %.1f s, cached load %.1f s (torch load %.1f s)", name,
                    variant, first_s, cached_s, torch_seconds)
        out[variant] = cached
    return out


def _cache_dir(args: argparse.Namespace, name: str) -> str:
    """A fresh, empty compiled-model cache directory for ``name`` under the run's."""
    return tempfile.mkdtemp(prefix=name.replace(":", "-") + "-", dir=args.compiled_cache)


def _clip(args: argparse.Namespace, loads: dict) -> dict[str, dict]:
    fp32, torch_s = _loaded(lambda: get_backbone(BackboneSpec(CLIP_BACKBONE, "random:0")))
    bf16 = get_backbone(BackboneSpec(CLIP_BACKBONE, "random:0", precision=BF16))
    x = pixels_for(args.n, fp32.geometry.image_size)
    bs = args.batch_size

    def autocast(batch: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32.encode_images(batch)

    slow = x[:args.n_slow]
    fns = {FP32: fp32.encode_images, BF16: bf16.encode_images}
    if args.openvino:
        cache = _cache_dir(args, "clip")
        fns.update(_ov_loads(
            lambda p: CompiledModule(_ClipTower(fp32).eval(), (3, *fp32.geometry.image_size),
                                     p, f"bench:clip-tower:{CLIP_BACKBONE}@random:0", cache),
            lambda m: m.source, "clip", torch_s, loads))
    for f in (*fns.values(), autocast):  # warm-up
        with torch.no_grad():
            f(x[:bs])
    variants = {p: (lambda f=f: rate(f, x, bs)) for p, f in fns.items()}
    variants["autocast"] = lambda: rate(autocast, slow, bs)
    out = {"clip": interleaved(variants, args.rounds)}
    windows = {p: WinClipExtractor(b) for p, b in ((FP32, fp32), (BF16, bf16))}
    for w in windows.values():
        w.extract(slow[:1])
    out["windows"] = interleaved({p: (lambda w=w: rate(w.extract, slow, 1))
                                  for p, w in windows.items()}, args.rounds)
    return out


def _variant(extractor: CnnExtractor, dtype: torch.dtype,
             channels_last: bool) -> Callable[[torch.Tensor], Any]:
    """A forward of a copy of ``extractor``'s stages in ``dtype`` and memory format (the
    variants the job does not run, measured to decide)."""
    net = to_precision(copy.deepcopy(extractor._net), dtype, channels_last)
    if not channels_last:
        net.to(memory_format=torch.contiguous_format)

    def forward(pixels: torch.Tensor) -> Any:
        out = net(to_input(pixels, extractor.device, dtype, channels_last))
        return {k: v.float().contiguous() for k, v in out.items()}

    return forward


def _cnns(args: argparse.Namespace, loads: dict) -> dict[str, dict]:
    out = {}
    for name in ("mobilenet_v2", "wide_resnet50_2"):
        ext = {}
        ext[FP32], torch_s = _loaded(
            lambda: CnnExtractor(CnnSpec(name, "random:0", (4, 8, 16), precision=FP32)))
        ext[BF16] = CnnExtractor(CnnSpec(name, "random:0", (4, 8, 16), precision=BF16))
        x = pixels_for(args.n, (ext[FP32].spec.image_size,) * 2)
        fns = {FP32: ext[FP32].extract, BF16: ext[BF16].extract,
               "fp32-cl": _variant(ext[FP32], torch.float32, channels_last=True),
               "bf16-nchw": _variant(ext[BF16], torch.bfloat16, channels_last=False)}
        if args.openvino:
            cache = _cache_dir(args, name)
            compiled = _ov_loads(
                lambda p: CnnExtractor(CnnSpec(name, "random:0", (4, 8, 16), precision=p,
                                               runtime=OPENVINO, compiled_cache=cache)),
                lambda e: e._compiled.source, f"cnn:{name}", torch_s, loads)
            fns.update({v: e.extract for v, e in compiled.items()})
        for f in fns.values():
            with torch.no_grad():
                f(x[:args.batch_size])
        out[f"cnn:{name}"] = interleaved(
            {p: (lambda f=f: rate(f, x, args.batch_size)) for p, f in fns.items()}, args.rounds)
    return out


def _dino(args: argparse.Namespace, loads: dict) -> dict[str, dict]:
    arch = "vit_small_patch14_dinov2"
    ext = {}
    ext[FP32], torch_s = _loaded(lambda: DinoExtractor(DinoSpec(arch, "random:0")))
    ext[BF16] = DinoExtractor(DinoSpec(arch, "random:0", precision=BF16))
    size = ext[FP32].spec.image_size
    x = pixels_for(args.n, (size,) * 2)
    fns = {p: e.extract for p, e in ext.items()}
    if args.openvino:
        cache = _cache_dir(args, "dino")
        fns.update(_ov_loads(
            lambda p: CompiledModule(_DinoTokens(ext[FP32].model).eval(), (3, size, size), p,
                                     f"bench:{ext[FP32].identity}", cache),
            lambda m: m.source, "dino", torch_s, loads))
    for f in fns.values():
        with torch.no_grad():
            f(x[:args.batch_size])
    return {"dino": interleaved({p: (lambda f=f: rate(f, x, args.batch_size))
                                 for p, f in fns.items()}, args.rounds)}


def _regad(args: argparse.Namespace, loads: dict) -> dict[str, dict]:
    spec = RegadSpec("resnet18", "random:0")
    ext = {p: RegadExtractor(RegadModel(spec), precision=p) for p in (FP32, BF16)}
    x = pixels_for(args.n, (spec.image_size,) * 2)
    for e in ext.values():
        e.extract(x[:args.batch_size])
    return {"regad": interleaved({p: (lambda e=e: rate(e.extract, x, args.batch_size))
                                  for p, e in ext.items()}, args.rounds)}


def extractors(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per extractor row, per variant: the ``interleaved`` figures; and per row with
    OpenVINO variants, its load seconds."""
    out: dict[str, dict] = {}
    loads: dict[str, dict] = {}
    for part in (_clip, _cnns, _dino, _regad):
        out.update(part(args, loads))
    return out, loads


# --------------------------------------------------------------- whole jobs


def _job_rate(args: argparse.Namespace, manifest: str, n: int, scorers: tuple[str, ...],
              variant: str, output: str) -> tuple[float, float]:
    """``timed`` of one ``score`` run of ``scorers`` over the ``n`` images of ``manifest``,
    at the precision and CNN runtime of ``variant`` (``JOB_VARIANTS``)."""
    precision, runtime = JOB_VARIANTS[variant]
    options = dict(cnn_weights="random:0", vit_weights="random:0")
    if runtime != TORCH:
        options.update(cnn_runtime=runtime,
                       compiled_cache=os.path.join(args.compiled_cache, "jobs"))
    shutil.rmtree(output, ignore_errors=True)
    config = ScoreConfig(
        manifest=manifest, output=output, k=args.k, seeds=(0,), scorers=scorers,
        backbone=BackboneSpec(CLIP_BACKBONE, "random:0", precision=precision),
        batch_size=args.batch_size, run_date="2000-01-01",
        run_id=f"runtime-{_slug(variant)}", options=options)
    if args.encode_prompts:
        clear(PROMPT_PAIRS)
    return timed(lambda: run_score(config, []), n)


def _slug(variant: str) -> str:
    return variant.replace("+", "-")


def jobs(args: argparse.Namespace) -> dict[str, dict]:
    paths = write_images(os.path.join(args.workdir, f"images-{args.image_format}"),
                         max(args.job_n, args.suite_n, args.cnn_n), 256, args.image_format)
    out = {}
    for label, scorers, n, rounds in (
            ("inctrl", ("inctrl",), args.job_n, args.rounds),
            ("six", TRAINING_FREE, args.suite_n, args.job_rounds or args.rounds),
            ("cnn", CNN_SCORERS, args.cnn_n, args.rounds)):
        if label not in args.jobs:
            continue
        manifests = {}
        for size in (n, args.k + 1):
            manifests[size] = os.path.join(args.workdir, f"manifest-{size}-{args.k}.parquet")
            one_group_manifest(paths[:size], args.k, manifests[size])
        variants = (FP32, BF16)
        if label != "inctrl" and args.openvino:  # the CNN scorers' extractor under OpenVINO
            variants += ("fp32+ov", "bf16+ov")
        runs = {}
        for variant in variants:
            for size in (n, args.k + 1):
                out_dir = os.path.join(args.workdir, f"out-{_slug(variant)}-{size}")
                runs[f"{variant}@{size}"] = (
                    lambda v=variant, s=size, o=out_dir:
                    _job_rate(args, manifests[s], s, scorers, v, o))
        for variant in variants:  # untimed: loads (compiles) the models, encodes nothing twice
            runs[f"{variant}@{args.k + 1}"]()
        clock = None
        if label == "inctrl":
            runs.update(_bare_towers(args, n - args.k - 1))
            clock = TowerClock()
            for variant in variants:
                clock.install(get_backbone(BackboneSpec(CLIP_BACKBONE, "random:0",
                                                        precision=variant)))
                for size in (n, args.k + 1):
                    key = f"{variant}@{size}"
                    runs[key] = clock.clocked(runs[key], key, size)
        res = interleaved(runs, rounds)
        entry = {}
        for variant in variants:
            whole, fixed = res[f"{variant}@{n}"], res[f"{variant}@{args.k + 1}"]
            entry[variant] = {**whole, "fixed": fixed}
            for key in ("ips", "cpu_ips"):  # the marginal rate: the fixed run taken out
                t_whole, t_fixed = n / whole[key], (args.k + 1) / fixed[key]
                entry[variant][f"marginal_{key}"] = (
                    (n - args.k - 1) / (t_whole - t_fixed) if t_whole > t_fixed else None)
            if f"bare-{variant}" in res:
                entry[variant]["bare"] = res[f"bare-{variant}"]
            if clock is not None:
                entry[variant]["tower_share"] = clock.shares(f"{variant}@{n}",
                                                             f"{variant}@{args.k + 1}")
        out[label] = entry
    return out


class TowerClock:
    """Wall seconds the InCTRL job spends in its CLIP image tower, run by run: it wraps
    ``encode_images`` of the job's own per-process backbone instances (``get_backbone``
    returns the one the job's extractor reads).

    The tower's share of the job's marginal time, (tower seconds of the n-image run minus
    those of the fixed run) / (wall seconds of the one minus the other), measured within one
    round, is what the issue's "marginal throughput ≥ 0.9x of the bare forward" comes to when
    the tower runs in the job as fast as alone (bench/RESULTS.md measured it so): unlike the
    ratio of the marginal rate to a bare tower timed minutes apart, it does not move with
    the host's speed between the two measurements."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = 0.0
        self.runs: dict[str, list[tuple[float, float]]] = {}  # key → [(wall s, tower s)]
        self._clock = clock

    def install(self, backbone: Any) -> None:
        inner = backbone.encode_images

        def encode_images(pixels: torch.Tensor) -> Any:
            start = self._clock()
            try:
                return inner(pixels)
            finally:
                self.seconds += self._clock() - start

        backbone.encode_images = encode_images  # the instance's attribute shadows the method

    def clocked(self, run: Callable[[], tuple[float, float]], key: str,
                images: int) -> Callable[[], tuple[float, float]]:
        def timed_run() -> tuple[float, float]:
            before = self.seconds
            ips, cpu_ips = run()
            self.runs.setdefault(key, []).append((images / ips, self.seconds - before))
            return ips, cpu_ips

        return timed_run

    def shares(self, whole: str, fixed: str) -> dict[str, Any]:
        """Per round: the tower's share of the marginal wall time, and the marginal wall
        seconds of the job and of its tower; with their medians."""
        per_round = []
        for (wall_n, tower_n), (wall_f, tower_f) in zip(self.runs[whole], self.runs[fixed]):
            job, tower = wall_n - wall_f, tower_n - tower_f
            per_round.append({"share": tower / job if job > 0 else None,
                              "job_s": job, "tower_s": tower})
        shares = [r["share"] for r in per_round if r["share"] is not None]
        return {"median": statistics.median(shares) if shares else None, "rounds": per_round}


def _bare_towers(args: argparse.Namespace, n: int) -> dict[str, Callable[[], tuple[float, float]]]:
    """The bare image tower the InCTRL job runs (the job's own per-process instance, same
    spec), on ``n`` preprocessed images in the job's batches: the denominator of the issue's
    "marginal ≥ 0.9x of the bare forward", timed in the same rounds as the jobs."""
    out = {}
    for precision in (FP32, BF16):
        tower = get_backbone(BackboneSpec(CLIP_BACKBONE, "random:0", precision=precision))
        pixels = pixels_for(n, tower.geometry.image_size)
        with torch.no_grad():
            tower.encode_images(pixels[:args.batch_size])  # warm-up
        out[f"bare-{precision}"] = (lambda t=tower, x=pixels:
                                    rate(t.encode_images, x, args.batch_size))
    return out


# --------------------------------------------------------------- report


def _cell(value: float | None, base: float | None) -> str:
    if value is None:
        return f"{'n/a':>15}"
    return f"{value:8.2f} {value / base:4.2f}x" if base else f"{value:9.2f}{'':6}"


def render(res: dict) -> str:
    lines = [f"bench.runtime, {res['date']}", f"machine: {res['machine']}",
             f"command: {res['command']}", f"CPU bf16: {res['capabilities']['describe']}; "
             f"oneDNN bf16: {res['capabilities']['onednn_bf16']}"]
    if res.get("openvino"):
        lines.append(f"OpenVINO: {res['openvino']}")
    elif res.get("openvino_missing"):
        lines.append(f"OpenVINO variants absent: {res['openvino_missing']}")
    if "extractors" in res:
        variants = [v for v in (FP32, BF16, "fp32-cl", "bf16-nchw", "autocast", *OV_VARIANTS)
                    if any(v in r for r in res["extractors"].values())]
        for key, unit in (("cpu_ips", "images per CPU-second"), ("ips", "images/s, wall")):
            lines += ["", f"extractors alone, batch {res['batch_size']}, {unit}, medians of "
                      f"{res['rounds']} interleaved rounds (x: against fp32 of the row)",
                      f"{'extractor':22}" + "".join(f"{v:>15}" for v in variants)
                      + f"{'load':>7}"]
            for name, r in res["extractors"].items():
                base = r[FP32][key]
                cells = "".join(_cell(r[v][key], base) if v in r else f"{'':15}"
                                for v in variants)
                lines.append(f"{name:22}{cells}{r[FP32]['load']:7.1f}")
        if any(v in variants for v in OV_VARIANTS):
            lines.append("ov-*: OpenVINO at that precision (the job offers it for the CNNs "
                         "only); none for windows and regad")
        if res.get("ov_loads"):
            lines += ["", "load seconds: the torch fp32 extractor's; OpenVINO's first load "
                      "(convert, compile, write the cache entry) and a cached one (the CNNs' "
                      "include building the torch module, as the job's do; clip's and dino's "
                      "start from it)",
                      f"{'extractor':22}{'torch':>8}"
                      + "".join(f"{v + ' ' + w:>16}" for v in OV_VARIANTS
                                for w in ("first", "cached"))]
            for name, r in res["ov_loads"].items():
                lines.append(f"{name:22}{r['torch_s']:8.1f}" + "".join(
                    f"{r[v][w]:16.1f}" for v in OV_VARIANTS for w in ("first_s", "cached_s")))
    if "jobs" in res:
        variants = [v for v in JOB_VARIANTS if any(v in r for r in res["jobs"].values())]
        for key, unit in (("cpu_ips", "images per CPU-second"), ("ips", "images/s, wall")):
            lines += ["", f"whole score job (DirectRunner, in-process), {unit}: whole run and "
                      "marginal (the k + 1 image run taken out); x: against fp32",
                      f"{'job':14}" + "".join(f"{v:>15}" for v in variants)
                      + "".join(f"{'marg. ' + v:>15}" for v in variants) + f"{'load':>7}"]
            for name, r in res["jobs"].items():
                whole = marginal = ""
                for v in variants:
                    if v not in r:
                        whole, marginal = whole + f"{'':15}", marginal + f"{'':15}"
                        continue
                    first = v == FP32
                    whole += _cell(r[v][key], None if first else r[FP32][key])
                    marginal += _cell(r[v][f"marginal_{key}"],
                                      None if first else r[FP32][f"marginal_{key}"])
                lines.append(f"{name:14}{whole}{marginal}{r[FP32]['load']:7.1f}")
            if "fp32+ov" in variants:
                lines.append("+ov: the CNN scorers' extractor under OpenVINO "
                             "(--cnn-runtime openvino); CLIP and DINO on torch")
            bare = {n: r for n, r in res["jobs"].items() if "bare" in r[FP32]}
            if bare:
                lines += ["", f"the job's marginal against the bare image tower it runs ({unit}, "
                          "same rounds; goal for bf16: >= 0.9x)",
                          f"{'job':14}{'fp32 bare':>15}{'fp32 marg/bare':>15}"
                          f"{'bf16 bare':>15}{'bf16 marg/bare':>15}"]
                for name, r in bare.items():
                    cells = ""
                    for p in (FP32, BF16):
                        tower, marginal = r[p]["bare"][key], r[p][f"marginal_{key}"]
                        ratio = f"{marginal / tower:15.2f}" if marginal else f"{'n/a':>15}"
                        cells += f"{tower:15.2f}{ratio}"
                    lines.append(f"{name:14}{cells}")
        shared = {n: r for n, r in res["jobs"].items() if "tower_share" in r[FP32]}
        for name, r in shared.items():
            lines += ["", f"{name}: the image tower's share of the job's marginal wall time, "
                      "measured inside the same runs (goal for bf16: >= 0.9)"]
            for p in (FP32, BF16):
                share = r[p]["tower_share"]
                rounds = ", ".join("n/a" if x["share"] is None else
                                   f"{x['share']:.3f} ({x['tower_s']:.1f} of {x['job_s']:.1f} s)"
                                   for x in share["rounds"])
                median = "n/a" if share["median"] is None else f"{share['median']:.3f}"
                lines.append(f"  {p}: median {median}; rounds: {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    caps = capabilities()
    print(f"CPU bf16: {caps['describe']}; oneDNN bf16: {caps['onednn_bf16']}", flush=True)
    if not caps["native_bf16"]:
        print("this CPU has no native bf16: the job refuses --precision bf16 here; nothing "
              "to compare", file=sys.stderr)
        return 1
    os.makedirs(args.workdir, exist_ok=True)
    version, missing = openvino_version()
    args.openvino = missing is None
    if missing:
        LOG.warning("no OpenVINO variants: %s", missing)
    res: dict = {"date": today(), "machine": machine(), "command": command_line(),
                 "capabilities": caps, "rounds": args.rounds, "batch_size": args.batch_size,
                 "openvino": version, "openvino_missing": missing}
    # compiled models go to a fresh directory, removed at the end: first loads compile
    args.compiled_cache = tempfile.mkdtemp(prefix="compiled-", dir=args.workdir)
    try:
        if "extractors" in args.parts:
            res["extractors"], res["ov_loads"] = extractors(args)
        if "jobs" in args.parts:
            res["jobs"] = jobs(args)
    finally:
        shutil.rmtree(args.compiled_cache, ignore_errors=True)
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
