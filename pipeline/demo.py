"""The embedded demo job: synthetic MVTec-layout datasets, their manifest, and the scoring job
on them (DirectRunner by default)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import fsspec
import pandas as pd

from pipeline.core.calibration import min_calibration_size
from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.model.backbone import BackboneSpec, tiny_spec, weights_obtainable
from pipeline.run import run_score

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo puts its data, manifest and results under one work folder."""

    workdir: str

    @property
    def data(self) -> str:
        return os.path.join(self.workdir, "data")

    @property
    def manifest(self) -> str:
        return os.path.join(self.workdir, "manifest.parquet")

    @property
    def output(self) -> str:
        return os.path.join(self.workdir, "results")


def demo_paths(workdir: str) -> DemoPaths:
    return DemoPaths(os.path.abspath(workdir))


def demo_backbone(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` when its weights can be had; otherwise (the demo only, never ``score``) the
    tiny random test backbone, with a loud warning."""
    if weights_obtainable(spec):
        return spec
    LOG.warning(
        "!!! Pretrained weights %s are neither cached nor downloadable here. The DEMO falls "
        "back to the tiny random test backbone; every output row says so in its model_id. "
        "Scores from it show the pipeline working, not detection quality. !!!",
        spec.backbone_id)
    return tiny_spec(spec.device, spec.precision)


#: The console table's metrics: (comparison column stem, header).
CONSOLE_METRICS = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("pixel_auroc", "pixel AUROC"),
                   ("aupro", "AUPRO"), ("realized_false_alarm_rate", "false alarms"),
                   ("recall_at_decision", "recall"))


def _cell(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def console_table(comparison: pd.DataFrame, scorers: Sequence[str]) -> str:
    """The comparison table in one Markdown table, a row per (dataset, scorer): few lines
    for the console (``comparison.md`` has a table per metric)."""
    shown = [(stem, head) for stem, head in CONSOLE_METRICS
             if any(f"{s}_{stem}_mean" in comparison.columns for s in scorers)]
    lines = ["| dataset | k | scorer | " + " | ".join(h for _, h in shown) + " |",
             "|" + "---|" * (3 + len(shown))]
    for row in comparison.itertuples(index=False):
        values = row._asdict()
        for scorer in scorers:
            cells = [_cell(values.get(f"{scorer}_{stem}_mean", float("nan")),
                           values.get(f"{scorer}_{stem}_std", float("nan")))
                     for stem, _ in shown]
            lines.append(f"| {values['dataset']} | {values['k']} | {scorer} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(paths: DemoPaths, config: ScoreConfig, beam_args: Sequence[str] = ()) -> str:
    """Generate the demo set into ``paths.data`` (with the calibration images its
    false-alarm rate needs), write its manifest to ``config.manifest`` and score it into
    ``config.output``; returns the comparison of the run's scorers (per dataset, the
    paper's view, with the false-alarm rate and recall at the decision) as one Markdown
    table; the per-category summary and the per-metric comparison are beside it in the
    summary folder."""
    # Enough normal calibration images per category that every query gets a decision at the
    # run's false-alarm rate (n + 1 >= 1/alpha), whatever the references leave over.
    roots = generate_demo(paths.data, seed=0,
                          n_calibration=min_calibration_size(config.false_alarm_rate))
    write_manifest(make_manifest(roots), config.manifest)
    run_score(config, beam_args)
    with fsspec.open(f"{summary_dir(config.output, config.run_date)}/comparison.parquet",
                     "rb") as f:
        comparison = pd.read_parquet(f)
    return console_table(comparison, config.scorers)
