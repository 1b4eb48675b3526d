"""Numeric precision of the extractors' forwards, one policy for all of them.

``--precision`` names what a run computes its image features in: ``fp32``, ``tf32`` (fp32
with TensorFloat-32 matrix products on CUDA; fp32 on the CPU) or ``bf16``. How bf16 is done
depends on the device, because what is fast differs:

- On the CPU, ``torch.autocast`` is slower than fp32 (it converts the fp32 weights at every
  call: 0.5x on ViT-B-16-plus-240). A bf16 run converts each extractor's module (its
  weights) and its input to bf16 once, which oneDNN runs on the CPU's bf16 units: the CLIP
  image tower (InCTRL, CoOp, WinCLIP's windows), the CNN stages (channels-last), DINOv2 and
  RegAD's CNN (bench/RESULTS.md, "bf16 on the CPU", has the speed-ups). That needs a CPU
  with native bf16 (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``): elsewhere oneDNN
  emulates bf16 and is slower than fp32, so a bf16 run is refused (``PrecisionError``, one
  line). What was found is logged once per process (``cpu_bf16``).
- On a CUDA device nothing changed, since no GPU was reachable to measure alternatives: the
  CLIP image tower runs under bf16 autocast (weights fp32), the CNN, DINOv2 and RegAD
  forwards in fp32 (``module_precision``).

Either way features leave every extractor as float32: the scorers' math (distances,
covariances, softmaxes) never sees bf16, and the prompt ensemble is encoded in fp32. The one
product that uses the bf16 units on float32 data is InCTRL's patch residual on tokens that
are all bf16 values, where bf16 products summed in float32 are exact products
(``pipeline.model.residual``).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)

FP32, TF32, BF16 = "fp32", "tf32", "bf16"
PRECISIONS = (FP32, TF32, BF16)
#: /proc/cpuinfo flags that mean bf16 arithmetic in hardware: AVX512-BF16 and AMX (x86),
#: the BF16 extension (ARM, listed under "Features")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_CPUINFO = "/proc/cpuinfo"


class PrecisionError(ValueError):
    """A precision this machine cannot run well (bf16 on a CPU without native bf16)."""


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU offers for bf16: the native-bf16 flags its kernel reports and the vector
    instruction set torch's kernels use (``torch.backends.cpu.get_cpu_capability()``)."""

    flags: tuple[str, ...]
    capability: str
    source: str = _CPUINFO

    @property
    def native(self) -> bool:
        return bool(self.flags)

    def describe(self) -> str:
        found = ", ".join(self.flags) if self.flags else "no native bf16 flag"
        return f"{found} ({self.source}); torch CPU capability {self.capability}"


def _cpu_flags(path: str = _CPUINFO) -> set[str] | None:
    """The CPU feature flags of the first processor in ``path``, or None where unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        return None
    return set()


def read_cpu_bf16(path: str = _CPUINFO) -> CpuBf16:
    """This CPU's bf16 capabilities, read now (``cpu_bf16`` caches them)."""
    flags = _cpu_flags(path)
    capability = torch.backends.cpu.get_cpu_capability()
    if flags is None:
        return CpuBf16((), capability, f"{path} unreadable")
    return CpuBf16(tuple(f for f in NATIVE_BF16_FLAGS if f in flags), capability, path)


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 capabilities, read once per process and logged once."""
    found = read_cpu_bf16()
    LOG.info("CPU bf16: %s: %s", "native" if found.native else "not native", found.describe())
    return found


def default_precision(device: str | torch.device, *, workers_here: bool = True) -> str:
    """What a run computes in when ``--precision`` is not given.

    - CUDA: bf16 (autocast, as before).
    - The CPU, when the run's workers are this machine (``workers_here``: the DirectRunner)
      and its CPU has native bf16: bf16. Measured there at 2.5x to 3.4x the fp32 speed with
      the quality kept: image AUROC per defect type within 0.007 of fp32 for SPADE, PaDiM
      and PatchCore on the larger photo set, InCTRL's scores at Spearman 0.9998
      (bench/RESULTS.md, "bf16 on the CPU"), which is the issue's rule for the default.
    - Any other CPU run: fp32. Without native bf16, bf16 is emulated and slower. On a remote
      runner the workers' CPU is not this machine's and cannot be seen from here, while the
      precision is fixed where the run is configured (rows' model ids, feature-cache keys,
      the summary, the nightly record): ``--precision bf16`` says they have it.

    ``--precision fp32`` keeps fp32's bit-identical scores on any machine."""
    if torch.device(device).type == "cuda":
        return BF16
    return BF16 if workers_here and cpu_bf16().native else FP32


def describe_default(device: str | torch.device, precision: str, *, workers_here: bool) -> str:
    """One line saying why ``precision`` is the default here."""
    if torch.device(device).type == "cuda":
        return f"precision {precision} (default on CUDA: bf16 autocast)"
    if precision == BF16:
        return (f"precision bf16 (default: this CPU has native bf16: {cpu_bf16().describe()}; "
                "--precision fp32 for fp32 scores)")
    if not workers_here:
        return ("precision fp32 (default for a remote runner: its workers' CPU cannot be seen "
                "from here; --precision bf16 where they have native bf16)")
    return f"precision fp32 (default: this CPU has no native bf16: {cpu_bf16().describe()})"


def check_precision(device: str | torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run well: bf16 on a CPU without native bf16."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == BF16 and torch.device(device).type == "cpu":
        found = cpu_bf16()
        if not found.native:
            raise PrecisionError(
                f"bf16 on this CPU would be emulated and slower than fp32 ({found.describe()}); "
                "run with --precision fp32")


def module_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype a frozen module's weights and inputs take: bfloat16 for bf16 on the CPU
    (checked to be native), float32 otherwise (on CUDA, bf16 is autocast's)."""
    check_precision(device, precision)
    if precision == BF16 and device.type == "cpu":
        return torch.bfloat16
    return torch.float32


def module_precision(device: str | torch.device, precision: str) -> str:
    """What a module-converting extractor (CNN, DINOv2, RegAD) computes in, for its spec and
    identity: bf16 for bf16 on the CPU, fp32 otherwise. On a GPU those extractors run as they
    always did, in fp32 (no GPU was reachable to measure autocast for them); only the CLIP
    image tower takes bf16 autocast there. Checks nothing (``module_dtype`` does, at load)."""
    dev = torch.device(device)
    return BF16 if precision == BF16 and dev.type == "cpu" else FP32


def to_precision(module: torch.nn.Module, dtype: torch.dtype,
                 channels_last: bool = False) -> torch.nn.Module:
    """``module`` (frozen, on its device) with its weights in ``dtype`` and, with
    ``channels_last``, its 4-d weights in the channels-last memory format; in place."""
    module.to(dtype)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def to_input(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype,
             channels_last: bool = False) -> torch.Tensor:
    """(B, 3, H, W) pixels on ``device`` in ``dtype`` (channels-last with ``channels_last``),
    as a module from ``to_precision`` takes them."""
    pixels = pixels.to(device, dtype, non_blocking=True)
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a non-CPU device for a bf16 run; nothing otherwise (the CPU runs bf16
    modules instead, ``module_dtype``)."""
    if precision == BF16 and device.type != "cpu":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_tf32(device: torch.device, precision: str) -> None:
    """TensorFloat-32 matrix products for a tf32 run on CUDA (process-wide torch flags)."""
    if precision == TF32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


__all__ = ["BF16", "FP32", "PRECISIONS", "TF32", "CpuBf16", "PrecisionError", "autocast",
           "check_precision", "cpu_bf16", "default_precision", "describe_default", "enable_tf32",
           "module_dtype", "module_precision", "read_cpu_bf16", "to_input", "to_precision"]
