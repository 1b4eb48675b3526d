"""ExtractFeatures: RunInference with a ModelHandler around the frozen CLIP backbone (the
training job's extraction); ExtractSuiteFeatures: the same around every extractor a scoring
run's scorers read (``pipeline.model.scorers.suite``), one forward per extractor per batch.

Also the Beam coders of pixel tensors, ImageFeatures and TensorBundles. Beam estimates the size of sampled
elements of every PCollection by encoding them, and samples nearly every batch of a short
run; pickling a batch of features costs more than a GPU needs to compute it. These coders
write raw tensor bytes and report sizes without encoding anything.
"""
from __future__ import annotations

import pickle
from typing import Any, Iterable, Optional, Sequence, Tuple

import apache_beam as beam
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from pipeline.core.schemas import METRICS_NAMESPACE
from pipeline.model.backbone import BackboneSpec, ClipBackbone, ImageFeatures, get_backbone
from pipeline.model.scorers.suite import FeatureSuite, SuiteSpec, TensorBundle, get_feature_suite


def _tensor_state(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    t = t.detach().to("cpu").contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), \
        t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from_state(state: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    dtype, shape, data = state
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def _tensor_size(t: torch.Tensor) -> int:
    return t.element_size() * t.nelement() + 32 + 8 * t.dim()


class TensorCoder(beam.coders.Coder):
    """A CPU tensor as dtype, shape and raw bytes; decodes to a CPU tensor."""

    def encode(self, value: torch.Tensor) -> bytes:
        return pickle.dumps(_tensor_state(value), pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> torch.Tensor:
        return _tensor_from_state(pickle.loads(encoded))

    def estimate_size(self, value: torch.Tensor) -> int:
        return _tensor_size(value)

    def to_type_hint(self):
        return torch.Tensor


class ImageFeaturesCoder(beam.coders.Coder):
    """ImageFeatures as two raw tensors; decodes to CPU tensors."""

    def encode(self, value: ImageFeatures) -> bytes:
        return pickle.dumps((_tensor_state(value.tokens), _tensor_state(value.embeds)),
                            pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> ImageFeatures:
        tokens, embeds = pickle.loads(encoded)
        return ImageFeatures(_tensor_from_state(tokens), _tensor_from_state(embeds))

    def estimate_size(self, value: ImageFeatures) -> int:
        return _tensor_size(value.tokens) + _tensor_size(value.embeds)

    def to_type_hint(self):
        return ImageFeatures


class TensorBundleCoder(beam.coders.Coder):
    """A TensorBundle as its named raw tensors; decodes to CPU tensors."""

    def encode(self, value: TensorBundle) -> bytes:
        return pickle.dumps({k: _tensor_state(v) for k, v in value.tensors.items()},
                            pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> TensorBundle:
        return TensorBundle({k: _tensor_from_state(v) for k, v in pickle.loads(encoded).items()})

    def estimate_size(self, value: TensorBundle) -> int:
        return sum(_tensor_size(v) + len(k) for k, v in value.tensors.items())

    def to_type_hint(self):
        return TensorBundle


beam.coders.registry.register_coder(torch.Tensor, TensorCoder)
beam.coders.registry.register_coder(ImageFeatures, ImageFeaturesCoder)
beam.coders.registry.register_coder(TensorBundle, TensorBundleCoder)

#: Element types of the keyed pixel and feature PCollections; they select the coders above.
KeyedPixels = Tuple[Any, torch.Tensor]
KeyedFeatures = Tuple[Any, ImageFeatures]
KeyedBundle = Tuple[Any, TensorBundle]


class ClipFeatureHandler(ModelHandler[torch.Tensor, ImageFeatures, ClipBackbone]):
    """Batches preprocessed images through the backbone; one model per worker process.

    With ``share_across_processes`` the model is loaded once per machine and shared by all
    SDK worker processes (one GPU, one copy), as RunInference does for large models. With
    ``on_device`` the features stay on the backbone's device, for a consumer fused into the
    same stage (ScoreQueries): on a GPU that saves copying 2.4 MB per image to the host and
    back; where a runner does encode them between stages they arrive on the CPU.
    """

    def __init__(self, spec: BackboneSpec, batch_size: int,
                 share_across_processes: bool = False, on_device: bool = False) -> None:
        # Fixed-size batches: BatchElements' timing-based sizing would start at one image and
        # settle on small batches (it weighs the whole fused downstream as per-batch cost),
        # which starves a GPU. Only a bundle's last batch is smaller.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size,
                         large_model=share_across_processes)
        self._spec = spec
        self._on_device = on_device

    def load_model(self) -> ClipBackbone:
        return get_backbone(self._spec)

    def run_inference(self, batch: Sequence[torch.Tensor], model: ClipBackbone,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[ImageFeatures]:
        feats = model.encode_images(torch.stack(list(batch)))
        # One copy per image into its own tensor (to the CPU straight from the device): a view
        # of the batch would carry the whole batch's storage downstream.
        where = feats.tokens.device if self._on_device else torch.device("cpu")
        return [ImageFeatures(feats.tokens[i:i + 1].to(where, copy=True),
                              feats.embeds[i:i + 1].to(where, copy=True))
                for i in range(len(batch))]

    def get_num_bytes(self, batch: Sequence[torch.Tensor]) -> int:
        return sum(t.element_size() * t.nelement() for t in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self):
        return self._batching_kwargs


class ExtractFeatures(beam.PTransform):
    """(key, pixels) → (key, ImageFeatures with a batch dimension of 1), batched on the device.

    Features are CPU tensors, or with ``on_device`` tensors on the backbone's device (see
    ClipFeatureHandler; meant for the query features that ScoreQueries consumes).
    """

    def __init__(self, spec: BackboneSpec, batch_size: int,
                 share_across_processes: bool = False, on_device: bool = False) -> None:
        super().__init__()
        self._handler = KeyedModelHandler(
            ClipFeatureHandler(spec, batch_size, share_across_processes, on_device))

    def expand(self, keyed_pixels):
        return keyed_pixels | "RunInference" >> RunInference(self._handler).with_output_types(
            KeyedFeatures)


class SuiteFeatureHandler(ModelHandler[TensorBundle, TensorBundle, FeatureSuite]):
    """Batches of per-view pixels through every extractor of a run: {view: (3, H, W)} per
    image in, that image's TensorBundle of features out. Loading, batching and
    ``on_device`` are as ClipFeatureHandler's; each extractor runs once per batch.
    ``references``: the images are references (extractors add their augmentations)."""

    def __init__(self, spec: SuiteSpec, batch_size: int,
                 share_across_processes: bool = False, on_device: bool = False,
                 references: bool = False) -> None:
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size,
                         large_model=share_across_processes)
        self._spec = spec
        self._on_device = on_device
        self._references = references

    def load_model(self) -> FeatureSuite:
        return get_feature_suite(self._spec)

    def run_inference(self, batch: Sequence[TensorBundle], model: FeatureSuite,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[TensorBundle]:
        views = {view: torch.stack([b[view] for b in batch]) for view in batch[0].keys()}
        feats = model.extract(views, references=self._references)
        if not self._on_device:
            feats = feats.to("cpu")
        return feats.split()

    def get_num_bytes(self, batch: Sequence[TensorBundle]) -> int:
        return sum(t.element_size() * t.nelement() for b in batch for t in b.tensors.values())

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self):
        return self._batching_kwargs


class ExtractSuiteFeatures(beam.PTransform):
    """(key, TensorBundle of views) → (key, TensorBundle of features, batch dimension 1);
    ``references``: reference images, with their augmentations' features."""

    def __init__(self, spec: SuiteSpec, batch_size: int,
                 share_across_processes: bool = False, on_device: bool = False,
                 references: bool = False) -> None:
        super().__init__()
        self._handler = KeyedModelHandler(SuiteFeatureHandler(
            spec, batch_size, share_across_processes, on_device, references))

    def expand(self, keyed_views):
        return keyed_views | "RunInference" >> RunInference(self._handler).with_output_types(
            KeyedBundle)
