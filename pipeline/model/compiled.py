"""Frozen torch modules compiled by OpenVINO for the CPU, cached on disk.

Why: on this project's CPU (Xeon with AMX) OpenVINO 2026.4 in bf16 ran the CNN extractors'
stages faster than torch's best path, bf16 channels-last: mobilenet_v2 2.37x,
wide_resnet50_2 1.26x; its fp32 ran mobilenet_v2 at 4.0x torch's fp32. It did not beat torch
on the transformers (the CLIP image tower 0.90x, DINOv2 1.00x of torch bf16), so only the CNN
extractor offers it (``--cnn-runtime openvino``; bench/RESULTS.md, "OpenVINO").

OpenVINO is an optional dependency (``pip install .[openvino]``); asking for it without it
installed, or on a GPU, fails at load with one line (``RuntimeUnavailable``).

Converting a module (tracing it) costs seconds; a process therefore compiles each module
once and keeps the compiled model in a cache directory (``cache_dir``), one entry per
``EntryKey``: the extractor's identity, a checksum of the module's weights, the input shape,
the precision, the OpenVINO version and the CPU (a compiled model is specific to the CPU's
instruction set). An entry is a blob (``export_model``) and a JSON record of its key and the
blob's sha256; a missing, stale (key fields differ) or corrupt (checksum, or OpenVINO
refusing it) entry is rebuilt and replaced atomically; a cache that cannot be written is
logged and skipped (the compiled model still runs).

Precision: OpenVINO's CPU plugin computes in bf16 by default where the CPU has AMX; the
precision is therefore always given (``INFERENCE_PRECISION_HINT``), at compile and at import:
``fp32`` runs float32 (within relative 1e-6 of torch's fp32 on the CNN stages, but not
bit-identical, which is why a run names its runtime in its identity), ``bf16`` runs bf16.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.model.precision import BF16, FP32

LOG = logging.getLogger(__name__)

TORCH, OPENVINO = "torch", "openvino"
RUNTIMES = (TORCH, OPENVINO)
#: environment variable naming the compiled-model cache directory
CACHE_ENV = "INCTRL_COMPILED_CACHE"
_HINTS = {FP32: "f32", BF16: "bf16"}


class RuntimeUnavailable(ValueError):
    """The runtime asked for cannot run here (not installed, or not for this device)."""


def check_runtime(runtime: str, device: str) -> None:
    """Refuse an unknown runtime, OpenVINO anywhere but on the CPU, or OpenVINO not
    installed (checked without importing it)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == OPENVINO:
        if torch.device(device).type != "cpu":
            raise RuntimeUnavailable(f"the {OPENVINO} runtime runs on the CPU; device is "
                                     f"{device!r}")
        if importlib.util.find_spec("openvino") is None:
            raise RuntimeUnavailable(_MISSING)


_MISSING = (f"the {OPENVINO} runtime needs the openvino package "
            "(pip install 'inctrl-beam[openvino]')")


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise RuntimeUnavailable(f"{_MISSING}: {exc}") from exc
    return openvino


def default_cache_dir() -> str:
    """``$INCTRL_COMPILED_CACHE``, else ``$XDG_CACHE_HOME/inctrl/compiled``, else
    ``~/.cache/inctrl/compiled``: local disk of the worker (compiled models are specific to
    its CPU)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "inctrl", "compiled")


def weights_checksum(module: torch.nn.Module) -> str:
    """sha256 of the module's state (every parameter's and buffer's name, dtype, shape and
    bytes, in state-dict order)."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, no copy
    return h.hexdigest()


@dataclass(frozen=True)
class EntryKey:
    """What a compiled model depends on; its digest names the cache entry."""

    identity: str
    weights: str  # weights_checksum
    input_shape: tuple[int, ...]  # one image's (C, H, W); the batch dimension is dynamic
    precision: str
    runtime: str  # OpenVINO's version
    cpu: str  # the CPU plugin's device name and capabilities

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}

    @property
    def digest(self) -> str:
        text = json.dumps(self.record(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class CompiledModule:
    """``module`` (frozen, float32, on the CPU; taking one (B, C, H, W) tensor, returning a
    dict of tensors) compiled by OpenVINO at ``precision``; called like the module, it
    returns the same keys as float32 CPU tensors.

    Thread-safe: each calling thread gets its own inference request.
    """

    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, int, int],
                 precision: str, identity: str, cache_dir: str | None = None,
                 threads: int | None = None) -> None:
        if precision not in _HINTS:
            raise ValueError(f"precision must be one of {tuple(_HINTS)}, got {precision!r}")
        self._ov = _openvino()
        self._core = self._ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": _HINTS[precision],
                       "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        cpu = (f"{self._core.get_property('CPU', 'FULL_DEVICE_NAME')}|"
               f"{','.join(self._core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}")
        self.key = EntryKey(identity, weights_checksum(module), tuple(input_shape), precision,
                            self._ov.get_version(), cpu)
        self.cache_dir = cache_dir or default_cache_dir()
        self.source = ""  # "cache" or "built": how this process got the model
        self._compiled = self._load() or self._build(module)
        self._outputs = list(self._compiled.outputs)
        self.output_names = [next(iter(sorted(o.get_names()))) for o in self._outputs]
        self._local = threading.local()

    # ------------------------------------------------------------------ the cache

    @property
    def paths(self) -> tuple[str, str]:
        """(blob, record) of this module's cache entry."""
        stem = os.path.join(self.cache_dir, self.key.digest)
        return stem + ".blob", stem + ".json"

    def _load(self) -> Any | None:
        """The cached compiled model, or None (logged) where there is none usable."""
        blob_path, record_path = self.paths
        if not os.path.exists(record_path):
            LOG.info("No compiled %s in %s: compiling it", self.key.identity, self.cache_dir)
            return None
        try:
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
            stale = {k: (record.get(k), v) for k, v in self.key.record().items()
                     if record.get(k) != v}
            if stale:
                raise ValueError(f"stale: recorded for {sorted(stale)} other than this run's")
            with open(blob_path, "rb") as f:
                blob = f.read()
            if hashlib.sha256(blob).hexdigest() != record.get("blob_sha256"):
                raise ValueError("corrupt: the blob's sha256 is not the recorded one")
            compiled = self._core.import_model(io.BytesIO(blob), "CPU", self.config)
        except Exception as exc:  # anything wrong with the entry: rebuild it
            LOG.warning("Compiled-model cache entry %s unusable (%s): rebuilding it",
                        record_path, exc)
            return None
        self.source = "cache"
        LOG.info("Loaded compiled %s from %s", self.key.identity, blob_path)
        return compiled

    def _build(self, module: torch.nn.Module) -> Any:
        c, h, w = self.key.input_shape
        example = torch.zeros(1, c, h, w)
        with torch.no_grad():
            expected = set(module(example))
        with warnings.catch_warnings():  # OpenVINO traces with torch.jit: its deprecation
            warnings.simplefilter("ignore", FutureWarning)
            converted = self._ov.convert_model(
                module, example_input=example, input=[self._ov.PartialShape([-1, c, h, w])])
        compiled = self._core.compile_model(converted, "CPU", self.config)
        names = {next(iter(sorted(o.get_names()))) for o in compiled.outputs}
        if names != expected:
            raise RuntimeUnavailable(f"OpenVINO named the outputs of {self.key.identity} "
                                     f"{sorted(names)}, not {sorted(expected)}")
        self.source = "built"
        self._store(compiled)
        return compiled

    def _store(self, compiled: Any) -> None:
        """Write the entry: blob, then its record, each by an atomic rename (a reader sees
        the old entry, a blob without its record, or the new entry whole)."""
        blob_path, record_path = self.paths
        buf = io.BytesIO()
        try:
            compiled.export_model(buf)
            blob = buf.getvalue()
            record = {**self.key.record(), "blob_sha256": hashlib.sha256(blob).hexdigest(),
                      "blob_bytes": len(blob)}
            os.makedirs(self.cache_dir, exist_ok=True)
            _write_atomic(blob_path, blob)
            _write_atomic(record_path, json.dumps(record, indent=1, sort_keys=True).encode())
        except Exception as exc:
            LOG.warning("Could not cache compiled %s in %s (%s); it runs uncached",
                        self.key.identity, self.cache_dir, exc)
            return
        LOG.info("Cached compiled %s in %s (%.1f MB)", self.key.identity, blob_path,
                 len(blob) / 1e6)

    # ------------------------------------------------------------------ the forward

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, C, H, W) → {output name: float32 tensor}, computed by OpenVINO."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        # The input is read in place (the call waits for the result); the outputs come back
        # as arrays of their own (share_outputs=False), outliving the request's next call.
        result = request.infer({0: array}, share_inputs=True)
        return {name: torch.from_numpy(result[port])
                for name, port in zip(self.output_names, self._outputs)}


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by the other workers sharing the cache
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
