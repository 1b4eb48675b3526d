"""The precision policy: which CPUs have native bf16 (read from /proc/cpuinfo), what each
device runs a bf16 request as, and the refusal of emulated bf16.

The flags are the Linux kernel's names for the x86 AVX512-BF16 and AMX-BF16 extensions
(arch/x86/include/asm/cpufeatures.h: ``avx512_bf16``, ``amx_bf16``) and the Arm BF16
extension (arch/arm64/kernel/cpuinfo.c: ``bf16`` under ``Features``). The cpuinfo files
below are fakes shaped as the kernel writes them, read through the real parser.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline import cli
from pipeline.model import precision
from pipeline.model.precision import (BF16, FP32, TF32, PrecisionError, autocast,
                                      check_precision, default_precision, module_dtype,
                                      module_precision, read_cpu_bf16)

# Two processors, as /proc/cpuinfo lists every logical CPU; the first one's flags count.
X86_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
X86_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_NO_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


def _cpuinfo(tmp_path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, flags", [
    (X86_AMX, ("avx512_bf16", "amx_bf16")),
    (X86_ZEN4, ("avx512_bf16",)),
    (ARM_BF16, ("bf16",)),
    (X86_NO_BF16, ()),
    (ARM_NO_BF16, ()),
    ("", ()),
])
def test_native_bf16_is_read_from_the_flags(tmp_path, text, flags):
    found = read_cpu_bf16(_cpuinfo(tmp_path, text))
    assert found.flags == flags and found.native == bool(flags)
    assert found.capability == torch.backends.cpu.get_cpu_capability()
    assert (", ".join(flags) if flags else "no native bf16 flag") in found.describe()


def test_an_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    found = read_cpu_bf16(str(tmp_path / "absent"))
    assert not found.native and "unreadable" in found.describe()


@pytest.fixture
def cpu_without_bf16(tmp_path, monkeypatch):
    """This process sees a CPU whose flags have no bf16 (the real parser on a fake file)."""
    path = _cpuinfo(tmp_path, X86_NO_BF16)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: read_cpu_bf16(path))


@pytest.fixture
def cpu_with_bf16(tmp_path, monkeypatch):
    path = _cpuinfo(tmp_path, X86_AMX)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: read_cpu_bf16(path))


def test_emulated_bf16_is_refused_in_one_line(cpu_without_bf16):
    with pytest.raises(PrecisionError) as err:
        check_precision("cpu", BF16)
    message = str(err.value)
    assert "\n" not in message and "--precision fp32" in message and "emulated" in message
    with pytest.raises(PrecisionError):
        module_dtype(torch.device("cpu"), BF16)
    # fp32 and tf32 (fp32 on the CPU) run anywhere; a GPU's bf16 is autocast, not the CPU's
    for p in (FP32, TF32):
        check_precision("cpu", p)
        assert module_dtype(torch.device("cpu"), p) == torch.float32
    check_precision("cuda", BF16)


def test_an_unknown_precision_is_refused():
    with pytest.raises(PrecisionError, match="fp16"):
        check_precision("cpu", "fp16")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_what_each_device_runs_a_precision_as(cpu_with_bf16):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # the CPU: bf16 is the module's own weights and input; no autocast
    assert module_dtype(cpu, BF16) == torch.bfloat16
    assert isinstance(autocast(cpu, BF16), contextlib.nullcontext)
    assert module_precision(cpu, BF16) == BF16
    # CUDA: weights stay fp32, the CLIP tower runs under bf16 autocast (as before); the
    # module-converting extractors stay fp32 there
    assert module_dtype(cuda, BF16) == torch.float32
    ctx = autocast(cuda, BF16)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert module_precision(cuda, BF16) == FP32
    for p in (FP32, TF32):
        assert module_precision(cpu, p) == module_precision(cuda, p) == FP32
        assert isinstance(autocast(cpu, p), contextlib.nullcontext)
        assert isinstance(autocast(cuda, p), contextlib.nullcontext)


def test_the_default_is_bf16_on_a_native_cpu_that_runs_the_workers(cpu_with_bf16):
    """The issue's rule: bf16 where the CPU has it natively (the quality check held), fp32
    otherwise; a remote runner's workers are not this CPU; CUDA keeps bf16 autocast."""
    assert default_precision("cpu") == BF16
    assert default_precision("cpu", workers_here=False) == FP32
    assert default_precision("cuda:0") == default_precision("cuda:0", workers_here=False) == BF16


def test_the_default_is_fp32_on_a_cpu_without_native_bf16(cpu_without_bf16):
    assert default_precision("cpu") == default_precision("cpu", workers_here=False) == FP32


def _score_backbone(argv: list[str]):
    from pipeline.cli.score import parse_score_command

    config, _, _ = parse_score_command(["--manifest", "m.parquet", "--output", "out", *argv])
    return config.backbone


def _score_precision(argv: list[str]) -> str:
    return _score_backbone(argv).precision


def test_the_score_command_resolves_and_logs_the_default(cpu_with_bf16, caplog):
    caplog.set_level("INFO", logger="pipeline.cli.flags")
    assert _score_precision([]) == BF16
    assert "precision bf16 (default: this CPU has native bf16: avx512_bf16, amx_bf16" \
        in caplog.text
    assert _score_precision(["--runner", "DirectRunner"]) == BF16
    caplog.clear()
    assert _score_precision(["--runner", "DataflowRunner", "--project", "p"]) == FP32
    assert "default for a remote runner" in caplog.text
    assert _score_precision(["--runner", "FlinkRunner", "--precision", "bf16"]) == BF16
    assert _score_precision(["--precision", "fp32"]) == FP32  # fp32's bit-identical scores
    # recorded where every row's model id and the feature cache read it
    assert "|precision=bf16" in _score_backbone([]).feature_id
    assert "|precision=fp32" in _score_backbone(["--runner", "FlinkRunner"]).feature_id


def test_the_default_on_a_cpu_without_bf16_is_fp32_and_says_why(cpu_without_bf16, caplog):
    caplog.set_level("INFO", logger="pipeline.cli.flags")
    assert _score_precision([]) == FP32
    assert "this CPU has no native bf16" in caplog.text


def test_training_keeps_fp32_on_the_cpu(cpu_with_bf16):
    from pipeline.cli.train import parse_train_args

    config, _ = parse_train_args(["--manifest", "m.parquet", "--output", "heads"])
    assert config.backbone.precision == FP32
    config, _ = parse_train_args(["--manifest", "m.parquet", "--output", "heads",
                                  "--precision", "bf16"])
    assert config.backbone.precision == BF16


def test_the_command_refuses_bf16_on_a_cpu_without_it_in_one_line(cpu_without_bf16, caplog,
                                                                   monkeypatch):
    import pipeline.run

    def refuse(*args, **kwargs):
        raise AssertionError("the job started with emulated bf16")

    monkeypatch.setattr(pipeline.run, "run_score", refuse)
    assert cli.main(["score", "--manifest", "m.parquet", "--output", "out",
                     "--precision", "bf16"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "bf16" in errors[0] and "--precision fp32" in errors[0]
