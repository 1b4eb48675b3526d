"""The training log: one row per step and one per epoch, written as Parquet and JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.reports import jsonable

STEP_SCHEMA = pa.schema([
    pa.field("epoch", pa.int64()),
    pa.field("step", pa.int64()),
    pa.field("loss", pa.float64()),
    pa.field("loss_final", pa.float64()),
    pa.field("loss_image_residual", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("step_time_s", pa.float64()),
])

EPOCH_SCHEMA = pa.schema([
    pa.field("epoch", pa.int64()),
    pa.field("steps", pa.int64()),
    pa.field("mean_loss", pa.float64()),
    pa.field("epoch_time_s", pa.float64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("val_auroc", pa.float64()),
    pa.field("val_auprc", pa.float64()),
    pa.field("val_auroc_pooled", pa.float64()),
    pa.field("val_auprc_pooled", pa.float64()),
])

STEPS_FILE = "train_log.parquet"
EPOCHS_FILE = "epochs.parquet"
JSON_FILE = "train_log.json"


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in schema},
                                schema=schema)


@dataclass
class TrainLog:
    """Collects per-step and per-epoch records; epoch 0 holds the untrained heads' validation."""

    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add_step(self, **record: Any) -> None:
        self.steps.append(record)

    def add_epoch(self, **record: Any) -> None:
        self.epochs.append(record)

    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def write(self, output: str) -> dict[str, str]:
        """Write the three files under ``output``; returns their paths."""
        output = output.rstrip("/")
        paths = {"steps": f"{output}/{STEPS_FILE}", "epochs": f"{output}/{EPOCHS_FILE}",
                 "json": f"{output}/{JSON_FILE}"}
        for key, rows, schema in (("steps", self.steps, STEP_SCHEMA),
                                  ("epochs", self.epochs, EPOCH_SCHEMA)):
            with fsspec.open(paths[key], "wb") as f:
                pq.write_table(_table(rows, schema), f)
        doc = dict(self.info, steps=self.steps, epochs=self.epochs)
        with fsspec.open(paths["json"], "w") as f:
            json.dump(jsonable(doc), f, indent=1, sort_keys=True)
        return paths
