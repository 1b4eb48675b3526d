"""Every command-line flag, defined once with its validator, in groups the commands compose.

Flags → these groups → one frozen configuration (``ScoreConfig``, ``TrainConfig``) → the
jobs. Flags that no group defines go to Beam when Beam knows them (``--runner``, Dataflow,
Flink and Dask options); any other stops the command with one message naming it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import difflib
import logging
import math
from typing import Sequence

import torch

from pipeline.core.config import (DEFAULT_BATCH_SIZE, DEFAULT_FALSE_ALARM_RATE, DEFAULT_K,
                                  ScoreConfig)
from pipeline.core.failures import DEFAULT_MAX_FAILED_FRACTION, EXIT_TOO_MANY_FAILURES
from pipeline.model.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, BackboneSpec
from pipeline.model.loading import backbone_for_heads
from pipeline.model.precision import (FP32, PRECISIONS, check_precision, default_precision,
                                       describe_default)
from pipeline.model.scorers import registry
from pipeline.model.scorers.references import RANDOM, SELECTIONS
from pipeline.model.scorers.base import positive_int  # one validator, shared with the scorers
from pipeline.model.scorers.suite import SuiteSpec, parse_scorers

LOG = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Validators: argparse types that turn a bad value into one usage line, never a traceback
# --------------------------------------------------------------------------------------------


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {text}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def distinct_int_list(text: str) -> tuple[int, ...]:
    values = int_list(text)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {text!r}")
    return values


def iso_date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from exc


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1 (``--max-failed-fraction``)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def even_batch(text: str) -> int:
    value = positive_int(text)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(
            f"expected an even batch size of at least 2 (half normal, half anomalous), got {text}")
    return value


def scorer_list(text: str) -> tuple[str, ...]:
    """``--scorer inctrl,patchcore``: known scorer names, each once."""
    try:
        return parse_scorers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def open_unit_fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a rate in (0, 1), got {text}")
    return value


def name_set(text: str) -> frozenset[str]:
    """Comma-separated names, e.g. ``--semantic-classes airplane,bird``."""
    return frozenset(c.strip() for c in text.split(",") if c.strip())


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Which backbone, with which weights, on which device and precision."""
    g = parser.add_argument_group("model")
    # None = not given: with --checkpoint the heads' metadata decides, otherwise the default.
    g.add_argument("--backbone", default=None,
                   help=f"open_clip model name (default: {DEFAULT_BACKBONE}; with --checkpoint, "
                        "the heads' backbone)")
    g.add_argument(
        "--pretrained", default=None,
        help="open_clip tag, weights file, 'local-dir:DIR', 'hf-hub:ORG/REPO' or 'random[:SEED]' "
             f"(default: {DEFAULT_PRETRAINED}, the weights InCTRL used; with --checkpoint, the "
             "heads' own towers or the weights they were trained on)")
    g.add_argument("--blocks", type=int_list, default=(),
                   help="1-based ViT blocks for patch tokens (default: InCTRL's 7,9,11 of 12)")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="what image features are computed in: fp32; tf32 (CUDA matrix "
                        "products); bf16 (autocast on CUDA; on a CPU with native bf16, every "
                        "extractor's weights and input; refused on other CPUs). Default: "
                        "bf16 on CUDA; for scoring on the CPU, bf16 when it has native bf16 "
                        "and the DirectRunner runs the workers here, fp32 otherwise (and for "
                        "training); the choice and its reason are logged")
    g.add_argument("--semantic-classes", type=name_set, default=None,
                   help="comma-separated category names scored with the semantic prompt pair")


def add_io_flags(parser: argparse.ArgumentParser, output_help: str,
                 manifest_help: str = "Parquet manifest (file or folder)"
                 ) -> argparse._ArgumentGroup:
    """The manifest read and the output root written; returns the group for more inputs."""
    g = parser.add_argument_group("input and output")
    g.add_argument("--manifest", required=True, help=manifest_help)
    g.add_argument("--output", required=True, help=output_help)
    return g


def add_k_flag(group: argparse._ArgumentGroup,
               help_: str = "normal references per group (default %(default)s)", *,
               zero_shot: bool = False) -> None:
    """``--k``: the shots, normal references per query (0 allowed with ``zero_shot``)."""
    group.add_argument("--k", type=non_negative_int if zero_shot else positive_int,
                       default=DEFAULT_K, help=help_)


def add_feature_cache_flag(group: argparse._ArgumentGroup, help_: str = (
        "folder caching reference features across runs (content hash + model)")) -> None:
    group.add_argument("--feature-cache", default=None, help=help_)


def add_scoring_flags(parser: argparse.ArgumentParser, *, seeds: tuple[int, ...] = (0,)) -> None:
    """How queries are scored: shots, seeds, heads, batches, patch maps."""
    g = parser.add_argument_group("scoring")
    add_k_flag(g, "normal references per group (default %(default)s; 0: zero-shot, for the "
                  "scorers that can: inctrl's text prior, winclip)", zero_shot=True)
    g.add_argument("--scorer", type=scorer_list, default=registry.DEFAULT_SCORERS,
                   metavar="NAMES",
                   help=f"comma-separated scorers compared in one run: "
                        f"{','.join(registry.scorer_names())} "
                        f"(default {','.join(registry.DEFAULT_SCORERS)})")
    g.add_argument("--seeds", type=distinct_int_list, default=seeds,
                   help="comma-separated sampler seeds; each gives one scoring (default "
                        f"{','.join(map(str, seeds))})")
    g.add_argument("--checkpoint", default=None,
                   help="trained heads (.safetensors); without it scoring is training-free")
    g.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="images per backbone batch (default %(default)s)")
    g.add_argument("--write-patch-map", action="store_true",
                   help="also store each query's patch map (every scorer's, on its grid)")
    g.add_argument("--reference-selection", choices=SELECTIONS, default=RANDOM,
                   help="random: the seeded draw of k (default); representative: the k that "
                        "best cover the group's normal pool in each scorer's feature space "
                        "(k-medoids; deterministic: with the whole pool every seed gives the "
                        "same k, seeds matter only with --reference-pool-limit)")
    g.add_argument("--reference-pool-limit", type=positive_int, default=None, metavar="N",
                   help="representative: choose from a seeded sample of N candidates per "
                        "group and seed (default: every candidate)")
    g.add_argument("--write-anomaly-maps", action="store_true",
                   help="write each query's anomaly map (16-bit PNG at the image's size) and "
                        "an overlay under OUT/maps/, their URIs in the scores rows")
    g.add_argument("--false-alarm-rate", type=open_unit_fraction,
                   default=DEFAULT_FALSE_ALARM_RATE, metavar="ALPHA",
                   help="each query's decision keeps this false-alarm rate on normal images, "
                        "calibrated on normal images that are not references (default "
                        "%(default)s; needs n + 1 >= 1/ALPHA calibration images per group)")


def add_comparison_model_flags(parser: argparse.ArgumentParser) -> None:
    """The settings of every registered extractor and scorer (``Option``), one group each
    (``--cnn-backbone``, ``--coreset-ratio``, ...)."""
    entries = [*((registry.extractor_entry(e), "extractor") for e in registry.extractor_names()),
               *((registry.scorer_entry(s), "scorer") for s in registry.scorer_names())]
    for entry, kind in entries:
        if not entry.options:
            continue
        g = parser.add_argument_group(f"{entry.name} {kind}")
        for o in entry.options:
            kwargs = dict(default=o.default, help=o.help, dest=o.name)
            if o.type is not None:
                kwargs["type"] = o.type
            if o.choices is not None:
                kwargs["choices"] = o.choices
            if o.metavar is not None:
                kwargs["metavar"] = o.metavar
            g.add_argument(o.flag, **kwargs)


def options_from_args(args: argparse.Namespace) -> dict:
    """The registered settings' values of parsed flags (by name)."""
    return {o.name: getattr(args, o.name) for o in registry.options() if hasattr(args, o.name)}


def add_run_flags(parser: argparse.ArgumentParser, *, run_date: bool = True) -> None:
    """The run's identity and its per-worker resources."""
    g = parser.add_argument_group("run")
    if run_date:
        g.add_argument("--run-date", type=iso_date, default=None,
                       help="partition date YYYY-MM-DD (default: today, UTC)")
    g.add_argument("--run-id", default=None, help="identifier written to every row")
    add_feature_cache_flag(g)
    g.add_argument("--decode-threads", type=non_negative_int, default=0,
                   help="threads decoding images per worker process (default 0: up to 8 "
                        "on a CUDA device, 1 on the CPU)")
    g.add_argument("--share-model-across-processes", action="store_true",
                   help="one model copy per machine (GPU workers with several SDK processes)")
    g.add_argument("--lock-wait", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run of the same output and date to finish "
                        "(default 0: refuse at once, exit status 4)")
    g.add_argument("--max-failed-fraction", type=fraction,
                   default=DEFAULT_MAX_FAILED_FRACTION, metavar="FRACTION",
                   help="largest fraction of (query, seed, scorer) rows that may fail (error "
                        "rows) for the run to commit; above it nothing is committed and the "
                        f"command exits with status {EXIT_TOO_MANY_FAILURES} (default "
                        "%(default)s)")


def add_vacuum_flags(parser: argparse.ArgumentParser) -> None:
    """What ``vacuum`` collects, and whether it only says so."""
    g = parser.add_argument_group("vacuum")
    g.add_argument("--output", required=True, help="output root (local path or URL)")
    g.add_argument("--dry-run", action="store_true",
                   help="print what would be removed; change nothing")
    g.add_argument("--deep", action="store_true",
                   help="also list every date with a record and remove what no record names "
                        "(outputs written before runs registered themselves; costs a listing "
                        "of every date)")


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    """Everything ``score`` takes (``nightly`` adds its own group)."""
    add_io_flags(parser, "output root (local path or URL)")
    add_scoring_flags(parser)
    add_run_flags(parser)
    add_model_flags(parser)
    add_comparison_model_flags(parser)


# --------------------------------------------------------------------------------------------
# Flags → configuration
# --------------------------------------------------------------------------------------------


def runs_here(args: argparse.Namespace) -> bool:
    """Whether the run's workers are this machine: the DirectRunner (Beam's default)."""
    return getattr(args, "beam_runner", None) in (None, "DirectRunner")


def backbone_from_args(args: argparse.Namespace, *, training: bool = False) -> BackboneSpec:
    """The backbone of the model flags; with ``--checkpoint``, the one its heads run on
    (``backbone_for_heads``: flags that contradict the heads' metadata are an error).

    Without ``--precision``: ``default_precision`` for a scoring run (bf16 on a CPU with
    native bf16 under the DirectRunner), logged with its reason; fp32 on the CPU for a
    ``training`` run."""
    precision = args.precision
    if precision is None and training and torch.device(args.device).type == "cpu":
        # Heads trained on bf16 features were not measured: training keeps fp32 on the CPU.
        precision = FP32
        LOG.info("precision fp32 (default for training on the CPU)")
    elif precision is None:
        here = runs_here(args)
        precision = default_precision(args.device, workers_here=here)
        LOG.info("%s", describe_default(args.device, precision, workers_here=here))
    args.precision = precision  # resolved once: a command reading the flags again agrees
    # bf16 on a CPU without native bf16: one line now, not a worker's traceback later
    check_precision(args.device, precision)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        return backbone_for_heads(checkpoint, name=args.backbone, pretrained=args.pretrained,
                                  blocks=tuple(args.blocks), device=args.device,
                                  precision=precision)
    return BackboneSpec(name=args.backbone or DEFAULT_BACKBONE,
                        pretrained=args.pretrained or DEFAULT_PRETRAINED,
                        blocks=tuple(args.blocks), device=args.device, precision=precision)


def score_config_from_args(args: argparse.Namespace, **overrides) -> ScoreConfig:
    """The ScoreConfig of parsed score flags; ``overrides`` set fields directly (the nightly
    date and cache, the demo's own manifest and output)."""
    kw = dict(
        k=args.k,
        seeds=tuple(args.seeds),
        backbone=backbone_from_args(args),
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        write_patch_map=args.write_patch_map,
        write_anomaly_maps=args.write_anomaly_maps,
        reference_selection=args.reference_selection,
        reference_pool_limit=args.reference_pool_limit,
        false_alarm_rate=args.false_alarm_rate,
        feature_cache=args.feature_cache,
        share_model_across_processes=args.share_model_across_processes,
        decode_threads=args.decode_threads,
        scorers=tuple(args.scorer),
        options=options_from_args(args),
        max_failed_fraction=args.max_failed_fraction,
    )
    for name in ("manifest", "run_date", "run_id", "semantic_classes"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if getattr(args, "output", None) is not None:
        kw["output"] = args.output.rstrip("/")
    kw.update(overrides)
    return ScoreConfig(**kw)


# --------------------------------------------------------------------------------------------
# Parsing: our flags, then Beam's, then nothing else
# --------------------------------------------------------------------------------------------


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every pipeline option Beam defines, runner-specific ones included."""
    # Beam's own parser class (its options add value-provider arguments to it); the same
    # classes Beam's PipelineOptions.get_all_options reads.
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    try:  # Dask's options register on import; the module needs the [dask] extra.
        import apache_beam.runners.dask.dask_runner  # noqa: F401
    except ImportError:
        pass
    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # noqa: SLF001
    return parser


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]  # noqa: SLF001


def _check_together(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags valid alone but not together: one usage message."""
    if hasattr(args, "scorer") and hasattr(args, "k"):
        try:
            suite = SuiteSpec(args.scorer, settings=tuple(options_from_args(args).items()),
                              checkpoint=getattr(args, "checkpoint", None))
            suite.check(args.k)
        except ValueError as exc:
            parser.error(f"--k {args.k} --scorer {','.join(args.scorer)}: {exc}")
    limit = getattr(args, "reference_pool_limit", None)
    if limit is not None:
        if args.reference_selection != "representative":
            parser.error("--reference-pool-limit samples the pool of --reference-selection "
                         "representative; the random draw takes k")
        if limit < args.k:
            parser.error(f"--reference-pool-limit {limit} is smaller than --k {args.k}")


def parse_with_beam(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                    ) -> tuple[argparse.Namespace, list[str]]:
    """(our flags, Beam's flags) of ``argv``; a flag neither knows ends the command with one
    usage message naming it and the closest flag of this command."""
    args, rest = parser.parse_known_args(argv)
    _check_together(parser, args)
    args.beam_runner = None  # the runner Beam's flags name (None: the DirectRunner)
    if not rest:
        return args, []
    beam = _beam_parser()
    beam_args, unknown = beam.parse_known_args(rest)
    args.beam_runner = getattr(beam_args, "runner", None)
    if unknown:
        flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
        # suggest only this command's own flags: Beam's are many and no usage text shows them
        known = _options(parser)
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
        parser.error("unrecognized arguments: " + " ".join(unknown)
                     + (" (" + "; ".join(hints) + ")" if hints else ""))
    return args, list(rest)
