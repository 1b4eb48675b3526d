"""Measuring helpers shared by the benchmarks: the machine, peak memory, Beam counters."""
from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def machine() -> str:
    """One line naming the CPU (and GPU), cores usable, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    import apache_beam

    return (f"{cpu} ({cores} cores usable{mem}){gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), apache-beam {apache_beam.__version__}, "
            f"python {platform.python_version()}")


def command_line() -> str:
    """How this process was started, as ``python -m bench.x ...`` when it was run that way."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _vm_hwm_mib() -> float | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def max_rss_mib() -> float:
    """The process's peak resident set so far (``ru_maxrss``), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak resident memory of this process per phase.

    Linux lets a process reset its own high-water mark (``/proc/self/clear_refs``), so each
    phase gets its own peak; elsewhere every phase reports ``ru_maxrss`` (peak since start).
    """

    def __init__(self) -> None:
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            return _vm_hwm_mib() is not None
        except OSError:
            return False

    @contextmanager
    def phase(self, out: dict, key: str) -> Iterator[None]:
        """Record the phase's peak RSS (MiB) in ``out[key]``, and peak CUDA memory if any."""
        self._reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            hwm = _vm_hwm_mib() if self.resettable else None
            out[key] = hwm if hwm is not None else max_rss_mib()
            if torch.cuda.is_available():
                out[key + "_cuda"] = torch.cuda.max_memory_allocated() / 2**20


@dataclass
class Timer:
    seconds: float = 0.0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> "Timer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start


def beam_metrics(result) -> dict[str, float]:
    """Counters and distribution sums of a finished pipeline, keyed ``step|namespace|name``.

    Distributions give ``…|name.count``, ``…|name.sum`` and ``…|name.max``. Steps are full labels
    (``PrepareReferences/ExtractReferenceFeatures/...``); :func:`metric` picks them by one
    part, so the reference and query branches stay apart.
    """
    out: dict[str, float] = {}
    query = result.metrics().query()
    for kind in ("counters", "distributions"):
        for m in query.get(kind, []):
            step = m.key.step
            name = f"{step}|{m.key.metric.namespace}|{m.key.metric.name}"
            value = m.committed if m.committed is not None else m.attempted
            if kind == "counters":
                out[name] = out.get(name, 0) + value
            else:
                out[name + ".count"] = out.get(name + ".count", 0) + value.count
                out[name + ".sum"] = out.get(name + ".sum", 0) + value.sum
                if value.count:
                    out[name + ".max"] = max(out.get(name + ".max", value.max), value.max)
    return out


def metric(metrics: dict[str, float], step: str, name: str, default: float = 0.0) -> float:
    """Sum of ``name`` over every step whose full label has a part ``step`` (any namespace)."""
    total, found = 0.0, False
    for key, value in metrics.items():
        s, _, n = key.split("|", 2)
        if step in s.split("/") and n == name:
            total += value
            found = True
    return total if found else default


def largest(metrics: dict[str, float], step: str, name: str, default: float = 0.0) -> float:
    """Largest value of ``name`` over every step whose full label has a part ``step``."""
    found = [value for key, value in metrics.items()
             if step in key.split("|", 2)[0].split("/") and key.split("|", 2)[2] == name]
    return max(found) if found else default


def work_summary(metrics: dict[str, float]) -> dict[str, float]:
    """What a scoring run did, from its counters: forwards per branch, sets, prompts, batches."""
    return {
        "reference_forwards": metric(metrics, "ExtractReferenceFeatures", "num_inferences"),
        "query_forwards": metric(metrics, "ExtractQueryFeatures", "num_inferences"),
        "query_batches": metric(metrics, "ExtractQueryFeatures",
                                "inference_request_batch_size.count"),
        "query_model_s": metric(metrics, "ExtractQueryFeatures",
                                "inference_batch_latency_micro_secs.sum") / 1e6,
        "reference_model_s": metric(metrics, "ExtractReferenceFeatures",
                                    "inference_batch_latency_micro_secs.sum") / 1e6,
        "reference_images_loaded": metric(metrics, "LoadReferenceImages", "images_loaded"),
        "query_images_loaded": metric(metrics, "LoadQueryImages", "images_loaded"),
        "queries_scored": metric(metrics, "ScoreQueries", "queries_scored"),
        "reference_sets_prepared": metric(metrics, "ScoreQueries", "reference_sets_prepared"),
        # the most groups' memories one scoring worker held at once (a max, not a sum)
        "reference_sets_held": largest(metrics, "ScoreQueries", "reference_sets_held.max"),
        "prompt_sets_encoded": metric(metrics, "EncodePrompts", "prompt_sets_encoded"),
        "prompt_sets_from_cache": metric(metrics, "EncodePrompts", "prompt_sets_from_cache"),
        "prompt_sets_reused": metric(metrics, "EncodePrompts", "prompt_sets_reused"),
        "feature_cache_hits": metric(metrics, "ExtractReferenceFeatures", "feature_cache_hits"),
    }
