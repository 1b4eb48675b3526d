"""The embedded demo job: synthetic MVTec-layout datasets, their manifest, and the scoring job
on them (DirectRunner by default)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import fsspec

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


def run_demo(paths: DemoPaths, config: ScoreConfig, beam_args: Sequence[str] = ()) -> str:
    """Generate the demo set into ``paths.data``, write its manifest to ``config.manifest``
    and score it into ``config.output``; returns the summary and the comparison of the
    run's scorers as Markdown."""
    roots = generate_demo(paths.data, seed=0)
    write_manifest(make_manifest(roots), config.manifest)
    run_score(config, beam_args)
    folder = summary_dir(config.output, config.run_date)
    with fsspec.open(f"{folder}/summary.md", "r") as f:
        summary = f.read()
    with fsspec.open(f"{folder}/comparison.md", "r") as f:
        return f"{summary}\n{f.read()}"
