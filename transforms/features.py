"""ExtractFeatures: RunInference with a ModelHandler around the frozen CLIP backbone."""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from pipeline.model.backbone import BackboneSpec, ClipBackbone, ImageFeatures, get_backbone


class ClipFeatureHandler(ModelHandler[torch.Tensor, ImageFeatures, ClipBackbone]):
    """Batches preprocessed images through the backbone; one model per worker process.

    With ``share_across_processes`` the model is loaded once per machine and shared by all
    SDK worker processes (one GPU, one copy), as RunInference does for large models.
    """

    def __init__(self, spec: BackboneSpec, batch_size: int,
                 share_across_processes: bool = False) -> None:
        super().__init__(min_batch_size=1, max_batch_size=batch_size,
                         large_model=share_across_processes)
        self._spec = spec

    def load_model(self) -> ClipBackbone:
        return get_backbone(self._spec)

    def run_inference(self, batch: Sequence[torch.Tensor], model: ClipBackbone,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[ImageFeatures]:
        feats = model.encode_images(torch.stack(list(batch))).to("cpu")
        # Clone per element: a view would pickle the whole batch's storage downstream.
        return [ImageFeatures(feats.tokens[i:i + 1].clone(), feats.embeds[i:i + 1].clone())
                for i in range(len(batch))]

    def get_num_bytes(self, batch: Sequence[torch.Tensor]) -> int:
        return sum(t.element_size() * t.nelement() for t in batch)

    def get_metrics_namespace(self) -> str:
        return "inctrl_features"

    def batch_elements_kwargs(self):
        return self._batching_kwargs


class ExtractFeatures(beam.PTransform):
    """(key, pixels) → (key, ImageFeatures with a batch dimension of 1), batched on the device."""

    def __init__(self, spec: BackboneSpec, batch_size: int,
                 share_across_processes: bool = False) -> None:
        super().__init__()
        self._handler = KeyedModelHandler(
            ClipFeatureHandler(spec, batch_size, share_across_processes))

    def expand(self, keyed_pixels):
        return keyed_pixels | "RunInference" >> RunInference(self._handler)
