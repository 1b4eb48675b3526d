"""The CNN stages compiled by OpenVINO (``--cnn-runtime openvino``,
``pipeline.model.compiled``): the same network as torch's, at the precision asked for, and
a compiled-model cache that serves only an entry made for this module, these weights, this
input, this precision, this OpenVINO and this CPU, rebuilding anything else.

The reference for "the same network" is torch's own forward of the module OpenVINO
converts: at fp32 the two differ by float32 rounding of differently ordered sums (relative
1e-6 on these random weights), at bf16 by bf16's 8-bit mantissa (about 1 %). OpenVINO's CPU
plugin computes in bf16 by default on a CPU with AMX, so an fp32 model that silently ran in
bf16 (a precision hint lost at import from the cache, say) fails the fp32 tolerance by four
orders of magnitude.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading

import pytest
import torch

from pipeline.model.compiled import (OPENVINO, TORCH, CompiledModule, EntryKey,
                                     RuntimeUnavailable, check_runtime, weights_checksum)
from pipeline.model.precision import BF16, FP32, cpu_bf16
from pipeline.model.scorers.cnn import CnnExtractor, CnnSpec
from pipeline.model.scorers.registry import extractor_entry
from pipeline.model.scorers.suite import SuiteSpec

pytest.importorskip("openvino", reason="the optional openvino package is not installed")

needs_bf16 = pytest.mark.skipif(not cpu_bf16().native,
                                reason="this CPU has no native bf16 (the job refuses it)")
SIZE = 64
FP32_TOLERANCE = 1e-5  # relative; bf16 arithmetic gives ~1e-2


def _spec(cache: str, **changes) -> CnnSpec:
    fields = dict(backbone="mobilenet_v2", weights="random:0", strides=(4, 8, 16), pooled=True,
                  image_size=SIZE, runtime=OPENVINO, compiled_cache=cache)
    return CnnSpec(**{**fields, **changes})


def _torch(spec: CnnSpec) -> CnnExtractor:
    return CnnExtractor(CnnSpec(**{**spec.__dict__, "runtime": TORCH, "compiled_cache": ""}))


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _assert_same_network(got: dict, want: dict, tolerance: float) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape, key
        assert got[key].is_contiguous(), key
        assert _relative_error(got[key], want[key]) < tolerance, key


def _entries(cache: str) -> list[str]:
    return sorted(f for f in os.listdir(cache) if not f.startswith("."))


# --------------------------------------------------------------- the network


def test_fp32_computes_torchs_network_in_float32(tmp_path):
    spec = _spec(str(tmp_path))
    compiled, reference = CnnExtractor(spec), _torch(spec)
    assert compiled.stages == reference.stages and compiled.pooled_dim == reference.pooled_dim
    x = _pixels(3)
    _assert_same_network(compiled.extract(x), reference.extract(x), FP32_TOLERANCE)
    # a batch of another size than any seen before: the batch dimension is dynamic
    _assert_same_network(compiled.extract(x[:1]), reference.extract(x[:1]), FP32_TOLERANCE)


@needs_bf16
def test_bf16_runs_in_bf16_and_stays_close(tmp_path):
    spec = _spec(str(tmp_path), precision=BF16)
    x = _pixels(2, seed=1)
    got, want = CnnExtractor(spec).extract(x), _torch(_spec("", precision=FP32)).extract(x)
    _assert_same_network(got, want, 0.05)
    assert max(_relative_error(got[k], want[k]) for k in want) > 1e-4, "bf16 did not run"


def test_identity_names_the_runtime_and_torch_identities_are_unchanged():
    compiled, plain = _spec("/somewhere"), _spec("", runtime=TORCH)
    entry = extractor_entry("cnn")
    assert entry.identity(compiled).endswith("|runtime=openvino")
    assert "runtime" not in entry.identity(plain)
    # the cache directory is where compiled models are kept, not what the features are
    assert entry.identity(compiled) == entry.identity(_spec("/elsewhere"))
    bf16 = _spec("", precision=BF16)
    assert entry.identity(bf16).endswith("|precision=bf16|runtime=openvino")


def test_the_runtime_reaches_the_spec_from_the_scorer_options(tmp_path):
    suite = SuiteSpec.of(("patchcore",), cnn_weights="random:0", cnn_runtime=OPENVINO,
                         compiled_cache=str(tmp_path))
    spec = suite.extractor_spec("cnn")
    assert isinstance(spec, CnnSpec)
    assert spec.runtime == OPENVINO and spec.compiled_cache == str(tmp_path)
    assert suite.extractor_identity("cnn").endswith("|runtime=openvino")
    assert SuiteSpec.of(("patchcore",)).extractor_spec("cnn").runtime == TORCH  # the default


def test_calls_from_several_threads_each_get_their_own_request(tmp_path):
    extractor = CnnExtractor(_spec(str(tmp_path)))
    inputs = [_pixels(2, seed=s) for s in range(4)]
    alone = [extractor.extract(x) for x in inputs]
    together: list = [None] * len(inputs)

    def run(i: int) -> None:
        for _ in range(3):
            together[i] = extractor.extract(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------- refusals


def test_refuses_a_gpu_an_unknown_runtime_and_a_missing_package(monkeypatch):
    with pytest.raises(RuntimeUnavailable, match="runs on the CPU"):
        CnnSpec("mobilenet_v2", "random:0", device="cuda", runtime=OPENVINO)
    with pytest.raises(ValueError, match="runtime must be one of"):
        check_runtime("onnx", "cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(RuntimeUnavailable, match="needs the openvino package"):
        _spec("")
    check_runtime(TORCH, "cpu")  # torch needs nothing more


# --------------------------------------------------------------- the cache


def test_a_second_load_comes_from_the_cache_at_the_same_precision(tmp_path):
    spec, x = _spec(str(tmp_path)), _pixels(2, seed=2)
    first = CnnExtractor(spec)
    assert first._compiled.source == "built"
    blob, record = first._compiled.paths
    assert _entries(str(tmp_path)) == sorted(os.path.basename(p) for p in (blob, record))
    with open(record) as f:
        recorded = json.load(f)
    assert recorded["weights"] == first._compiled.key.weights
    assert recorded["input_shape"] == [3, SIZE, SIZE] and recorded["precision"] == FP32
    second = CnnExtractor(spec)
    assert second._compiled.source == "cache"
    a, b = first.extract(x), second.extract(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the fp32 hint survives the import: still float32 arithmetic, not AMX's default bf16
    _assert_same_network(b, _torch(spec).extract(x), FP32_TOLERANCE)


def test_each_weights_input_and_precision_has_its_own_entry(tmp_path):
    cache = str(tmp_path)
    keys = {CnnExtractor(_spec(cache, **change))._compiled.key.digest
            for change in ({}, {"weights": "random:1"}, {"image_size": SIZE + 32})}
    assert len(keys) == 3 and len(_entries(cache)) == 6
    other = torch.nn.Conv2d(3, 4, 3)
    same = torch.nn.Conv2d(3, 4, 3)
    same.load_state_dict(other.state_dict())
    assert weights_checksum(other) == weights_checksum(same)
    with torch.no_grad():
        same.bias[0] += 1e-7  # one value, one ulp-ish: another checksum
    assert weights_checksum(other) != weights_checksum(same)


def test_digest_covers_every_field_of_the_key():
    base = EntryKey("cnn", "w" * 64, (3, 64, 64), FP32, "2026.4.1", "cpu|BF16")
    for field, value in (("identity", "cnn2"), ("weights", "v" * 64), ("input_shape", (3, 64, 96)),
                         ("precision", BF16), ("runtime", "2026.5.0"), ("cpu", "cpu|FP32")):
        assert EntryKey(**{**base.__dict__, field: value}).digest != base.digest, field


@pytest.mark.parametrize("damage", ["flip_blob", "truncate_blob", "drop_blob", "garble_record",
                                    "stale_record"])
def test_a_corrupt_or_stale_entry_is_rebuilt(tmp_path, caplog, damage):
    spec, x = _spec(str(tmp_path)), _pixels(2, seed=3)
    first = CnnExtractor(spec)
    want = first.extract(x)
    blob, record = first._compiled.paths
    if damage == "flip_blob":
        with open(blob, "r+b") as f:
            f.seek(os.path.getsize(blob) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate_blob":
        os.truncate(blob, os.path.getsize(blob) // 3)
    elif damage == "drop_blob":
        os.remove(blob)
    elif damage == "garble_record":
        with open(record, "w") as f:
            f.write('{"identity": ')
    else:  # an entry recorded for another OpenVINO under this name
        with open(record) as f:
            data = json.load(f)
        with open(record, "w") as f:
            json.dump({**data, "runtime": "2020.1.0"}, f)
    with caplog.at_level(logging.WARNING, logger="pipeline.model.compiled"):
        again = CnnExtractor(spec)
    assert again._compiled.source == "built"
    assert any("unusable" in r.getMessage() for r in caplog.records)
    got = again.extract(x)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the entry was replaced whole: the next load takes it
    assert CnnExtractor(spec)._compiled.source == "cache"


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    spec, x = _spec(str(blocker / "cache")), _pixels(2, seed=4)
    with caplog.at_level(logging.WARNING, logger="pipeline.model.compiled"):
        extractor = CnnExtractor(spec)
    assert extractor._compiled.source == "built"
    assert any("runs uncached" in r.getMessage() for r in caplog.records)
    _assert_same_network(extractor.extract(x), _torch(spec).extract(x), FP32_TOLERANCE)


def test_default_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    from pipeline.model.compiled import CACHE_ENV, default_cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "inctrl" / "compiled")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    extractor = CnnExtractor(_spec(""))  # no directory in the spec: the environment's
    assert extractor._compiled.paths[0].startswith(str(tmp_path / "env"))
    assert CompiledModule is type(extractor._compiled)
