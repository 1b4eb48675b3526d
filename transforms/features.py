"""ExtractSuiteFeatures: RunInference with a ModelHandler around every extractor a run's
scorers read (``pipeline.model.scorers.suite``), one forward per extractor per batch; the
training job's extraction is the same with InCTRL's extractor alone.

Also the Beam coders of tensors and TensorBundles. Beam estimates the size of sampled
elements of every PCollection by encoding them, and samples nearly every batch of a short
run; pickling a batch of features costs more than a GPU needs to compute it. These coders
write raw tensor bytes and report sizes without encoding anything.
"""
from __future__ import annotations

import logging
import pickle
from typing import Any, Iterable, Optional, Sequence, Tuple

import apache_beam as beam
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from pipeline.core.schemas import ERRORS, METRICS_NAMESPACE
from pipeline.model.scorers.suite import FeatureSuite, SuiteSpec, TensorBundle, get_feature_suite
from transforms.errors import row_error

LOG = logging.getLogger(__name__)


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
beam.coders.registry.register_coder(TensorBundle, TensorBundleCoder)

#: Element types of the keyed pixel and feature PCollections; they select the coders above.
KeyedBundle = Tuple[Any, TensorBundle]


class SuiteFeatureHandler(ModelHandler[TensorBundle, TensorBundle, FeatureSuite]):
    """Batches of per-view pixels through every extractor of a run: {view: (3, H, W)} per
    image in, that image's TensorBundle of features out; each extractor runs once per
    batch, its model loaded once per worker process.

    With ``share_across_processes`` the models are loaded once per machine and shared by
    all SDK worker processes (one GPU, one copy), as RunInference does for large models.
    With ``on_device`` the features stay on the extractors' device, for a consumer fused
    into the same stage (ScoreQueries): on a GPU that saves copying megabytes per image to
    the host and back; where a runner does encode them between stages they arrive on the
    CPU. ``references``: the images are references (extractors add their augmentations).
    ``views``: each image's features are a view of its batch's, not a copy (2.4 MB an image
    saved for InCTRL's tokens), for a consumer fused into the same stage that is done with
    a batch's images soon after (ScoreQueries); never for features held per group, where
    every view would keep its whole batch.
    """

    def __init__(self, spec: SuiteSpec, batch_size: int,
                 share_across_processes: bool = False, on_device: bool = False,
                 references: bool = False, views: bool = False) -> None:
        # Fixed-size batches: BatchElements' timing-based sizing would start at one image and
        # settle on small batches (it weighs the whole fused downstream as per-batch cost),
        # which starves a GPU. Only a bundle's last batch is smaller.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size,
                         large_model=share_across_processes)
        self._spec = spec
        self._on_device = on_device
        self._references = references
        self._views = views

    def load_model(self) -> FeatureSuite:
        return get_feature_suite(self._spec)

    def run_inference(self, batch: Sequence[TensorBundle], model: FeatureSuite,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[TensorBundle]:
        views = {view: torch.stack([b[view] for b in batch]) for view in batch[0].keys()}
        feats = model.extract(views, references=self._references)
        if not self._on_device:
            feats = feats.to("cpu")
        return feats.split(copy=not self._views)

    def get_num_bytes(self, batch: Sequence[TensorBundle]) -> int:
        return sum(t.element_size() * t.nelement() for b in batch for t in b.tensors.values())

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def batch_elements_kwargs(self):
        return self._batching_kwargs


#: The stage of error rows for images whose features could not be computed.
STAGE_EXTRACT = "extract"


class _FailedBatchFn(beam.DoFn):
    """A batch RunInference could not run → one ``extract`` error row per image in it."""

    def __init__(self) -> None:
        self._failed = Metrics.counter(METRICS_NAMESPACE, "images_failed_extract")

    def process(self, element) -> Iterable:
        batch, (exc_type, exc_repr, _trace) = element
        name = getattr(exc_type, "__name__", str(exc_type))
        reason = f"{name}: {exc_repr} (while extracting features of a batch of {len(batch)})"
        LOG.warning("Feature extraction failed for a batch of %d images: %s", len(batch), reason)
        for (row, _sha256), _views in batch:
            self._failed.inc()
            yield row_error(row, STAGE_EXTRACT, reason)


class ExtractSuiteFeatures(beam.PTransform):
    """(key, TensorBundle of views) → ``{'features': (key, TensorBundle of features, batch
    dimension 1), 'errors': RowError}``; ``references``: reference images, with their
    augmentations' features. Keys are ``(row, sha256)``.

    A batch whose forward raises (a bad tensor, an out-of-memory) becomes ``extract`` error
    rows for its images (RunInference's dead-letter output), and the rest go on.
    ``views``: as ``SuiteFeatureHandler``'s.
    """

    def __init__(self, spec: SuiteSpec, batch_size: int,
                 share_across_processes: bool = False, on_device: bool = False,
                 references: bool = False, views: bool = False) -> None:
        super().__init__()
        self._handler = KeyedModelHandler(SuiteFeatureHandler(
            spec, batch_size, share_across_processes, on_device, references, views))

    def expand(self, keyed_views):
        features, failed = (keyed_views
                            | "RunInference" >> RunInference(self._handler)
                            .with_exception_handling())
        errors = failed.failed_inferences | "FailedBatches" >> beam.ParDo(_FailedBatchFn())
        return {"features": features | "Typed" >> beam.Map(lambda kv: kv).with_output_types(
                    KeyedBundle),
                ERRORS: errors}
