"""transforms.features: the raw-bytes Beam coders of tensors and TensorBundles, and the model
handler's per-image split of a batched forward."""
from __future__ import annotations

import contextlib
import pickle
import warnings
from typing import Iterator

import apache_beam as beam
import pytest
import torch

from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.scorers.suite import SuiteSpec, TensorBundle
from transforms.features import KeyedBundle, SuiteFeatureHandler, TensorBundleCoder, TensorCoder

# Pickle framing, dtype name and shape around the raw bytes: tens of bytes, whatever the size.
OVERHEAD = 32

# Same-size integer views, to compare values bit for bit (NaN, -0.0 and inf included).
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.int64: torch.int64, torch.bool: torch.uint8}
DTYPES = list(_BITS)
SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4), (1, 3, 16, 8)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.device.type == "cpu"
    assert torch.equal(_bits(got), _bits(want))


def _sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Distinct values of ``dtype``; floats include NaN, ±inf and -0.0 where there is room."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-2**62, 2**62, shape, generator=g, dtype=torch.int64)
    t = (torch.randn(shape, generator=g) * 100).to(dtype)
    flat = t.view(-1)
    for i, special in enumerate((float("nan"), float("inf"), float("-inf"), -0.0)):
        if i < flat.numel() - 1:
            flat[i] = special
    return t


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_round_trip(dtype, shape):
    x = _sample(shape, dtype)
    assert_same(TensorCoder().decode(TensorCoder().encode(x)), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", ["transposed", "strided", "expanded", "offset"])
def test_non_contiguous_input_round_trips_as_its_values(dtype, view):
    base = _sample((6, 8), dtype, seed=1)
    x = {"transposed": base.t(), "strided": base[::2, 1::3], "expanded": base[:1].expand(4, 8),
         "offset": base[3:, 2:5]}[view]
    assert not x.is_contiguous() or x.storage_offset() > 0
    got = TensorCoder().decode(TensorCoder().encode(x))
    assert_same(got, x.contiguous())
    assert got.untyped_storage().nbytes() == x.nelement() * x.element_size()  # not the base's


def test_a_tensor_that_requires_grad_encodes_its_values():
    x = torch.randn(3, 4, requires_grad=True)
    got = TensorCoder().decode(TensorCoder().encode(x * 2))
    assert not got.requires_grad
    assert_same(got, (x * 2).detach())


@contextlib.contextmanager
def _read_only_buffers_raise() -> Iterator[None]:
    """torch warns when a tensor is made over a read-only buffer, once per process unless
    told to warn always; here the warning is an error."""
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        torch.set_warn_always(always)


@pytest.mark.parametrize("shape", [(), (1,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoded_tensor_is_writable_and_independent(dtype, shape):
    # No zeros, so that zeroing the decoded tensor changes every byte.
    x = torch.ones(shape, dtype=torch.bool) if dtype == torch.bool else \
        _sample(shape, dtype, seed=2).abs() + 1
    original = x.clone()
    encoded = TensorCoder().encode(x)
    saved = bytes(bytearray(encoded))
    with _read_only_buffers_raise():
        a = TensorCoder().decode(encoded)
        b = TensorCoder().decode(encoded)
        a.zero_()
        x.zero_()
    assert not bool(a.any())
    assert encoded == saved
    assert_same(b, original)  # neither the bytes nor another decode share a's memory
    assert_same(TensorCoder().decode(encoded), original)


@pytest.mark.parametrize("shape", SHAPES + [(64, 100)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_estimate_size_is_close_to_the_payload(dtype, shape):
    x = _sample(shape, dtype)
    encoded = TensorCoder().encode(x)
    estimate = TensorCoder().estimate_size(x)
    assert estimate >= x.nelement() * x.element_size()
    assert abs(estimate - len(encoded)) <= OVERHEAD, (estimate, len(encoded))


def test_estimate_size_does_not_encode(monkeypatch):
    x = torch.randn(4, 4)
    monkeypatch.setattr(TensorCoder, "encode", lambda self, v: pytest.fail("encoded"))
    assert TensorCoder().estimate_size(x) == TensorCoder().estimate_size(x.t())


def _features(batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> TensorBundle:
    return TensorBundle({"clip/tokens": _sample((batch, 3, 16, 8), dtype, seed),
                         "clip/embeds": _sample((batch, 12), dtype, seed + 1)})


def _assert_same_bundle(got: TensorBundle, want: TensorBundle) -> None:
    assert isinstance(got, TensorBundle) and list(got.keys()) == list(want.keys())
    for key in want.keys():
        assert_same(got[key], want[key])


@pytest.mark.parametrize("feats", [
    _features(1), _features(3, torch.bfloat16), _features(2, torch.float16), _features(0),
    TensorBundle({"clip/tokens": _sample((2, 3, 16, 8), torch.float32).transpose(1, 2),
                  "clip/embeds": _sample((12, 2), torch.float32).t()}),
    TensorBundle({"cnn/s8": _sample((1, 2, 4, 8), torch.float16),
                  "image/size": torch.tensor([[5, 7]])}),
], ids=["fp32", "bf16", "fp16", "empty", "non-contiguous", "mixed-dtypes"])
def test_bundles_round_trip(feats):
    coder = TensorBundleCoder()
    encoded = coder.encode(feats)
    _assert_same_bundle(coder.decode(encoded), feats)
    payload = sum(t.nelement() * t.element_size() for t in feats.tensors.values())
    estimate = coder.estimate_size(feats)
    assert estimate >= payload
    assert abs(estimate - len(encoded)) <= 2 * OVERHEAD + 64, (estimate, len(encoded))


def test_decoded_bundles_are_writable_and_independent():
    feats = _features(2)
    want = TensorBundle({k: v.clone() for k, v in feats.tensors.items()})
    encoded = TensorBundleCoder().encode(feats)
    with _read_only_buffers_raise():
        got = TensorBundleCoder().decode(encoded)
        for value in got.tensors.values():
            value.zero_()
    _assert_same_bundle(TensorBundleCoder().decode(encoded), want)
    _assert_same_bundle(feats, want)


def test_registry_picks_the_coders():
    assert isinstance(beam.coders.registry.get_coder(torch.Tensor), TensorCoder)
    assert isinstance(beam.coders.registry.get_coder(TensorBundle), TensorBundleCoder)
    keyed = beam.coders.registry.get_coder(KeyedBundle)
    feats = _features(1, seed=5)
    key, got = keyed.decode(keyed.encode(("row-1", feats)))
    assert key == "row-1"
    _assert_same_bundle(got, feats)


# ------------------------------------------------------------------ the model handler


@pytest.fixture(scope="module")
def tiny():
    return get_backbone(tiny_spec())


def test_run_inference_returns_each_image_of_a_batched_forward(tiny):
    """InCTRL's extractor alone (the training job's extraction) through the suite handler."""
    geo = tiny.geometry
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, *geo.image_size, generator=g)
    handler = SuiteFeatureHandler(SuiteSpec(clip=tiny_spec()), batch_size=3)
    suite = handler.load_model()
    assert suite.extractors["clip"].backbone is tiny

    out = list(handler.run_inference([TensorBundle({"clip": p}) for p in pixels], suite))
    want = tiny.encode_images(pixels)

    assert len(out) == 3
    for i, f in enumerate(out):
        tokens, embeds = f["clip/tokens"], f["clip/embeds"]
        assert tokens.shape == (1, geo.num_layers, geo.num_patches, geo.token_width)
        assert embeds.shape == (1, geo.embed_dim)
        torch.testing.assert_close(tokens, want.tokens[i:i + 1], rtol=0, atol=0)
        torch.testing.assert_close(embeds, want.embeds[i:i + 1], rtol=0, atol=0)
        # Its own copy: a view would carry the whole batch's storage downstream.
        assert tokens.untyped_storage().nbytes() == tokens.nelement() * tokens.element_size()
        assert embeds.untyped_storage().nbytes() == embeds.nelement() * embeds.element_size()
    # The images are not mixed up: each differs from the others.
    assert not torch.equal(out[0]["clip/embeds"], out[1]["clip/embeds"])


def test_views_share_the_batch_and_encode_their_own_image_alone(tiny):
    """The query path's ``views``: the same values as the copies, each a view of one batch
    storage (no per-image copy), and the coder still writes one image's bytes, not the
    batch's: a runner that encodes them between stages ships 1/B of the storage each."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, *tiny.geometry.image_size, generator=g)
    inputs = [TensorBundle({"clip": p}) for p in pixels]
    copies = SuiteFeatureHandler(SuiteSpec(clip=tiny_spec()), batch_size=3)
    views = SuiteFeatureHandler(SuiteSpec(clip=tiny_spec()), batch_size=3, views=True)
    suite = copies.load_model()
    want = list(copies.run_inference(inputs, suite))
    got = list(views.run_inference(inputs, suite))
    storages = {f["clip/tokens"].untyped_storage().data_ptr() for f in got}
    assert len(storages) == 1  # one batch, no copies
    for i, (v, c) in enumerate(zip(got, want)):
        tokens = v["clip/tokens"]
        assert tokens.untyped_storage().nbytes() == 3 * tokens.nelement() * tokens.element_size()
        assert tokens.storage_offset() == i * tokens.nelement()
        for key in c.keys():
            assert_same(v[key], c[key])
        decoded = TensorBundleCoder().decode(TensorBundleCoder().encode(v))
        assert decoded["clip/tokens"].untyped_storage().nbytes() == \
            tokens.nelement() * tokens.element_size()
        for key in c.keys():
            assert_same(decoded[key], c[key])
        # A runner that pickles elements (not through the coder) ships the image alone too.
        pickled = pickle.dumps(v)
        assert len(pickled) < 1.5 * tokens.nelement() * tokens.element_size()
        unpickled = pickle.loads(pickled)
        for key in c.keys():
            assert_same(unpickled[key], c[key])
    whole = pickle.dumps(got[0].tensors["clip/tokens"])  # what torch alone would ship
    assert len(whole) > 2.5 * got[0]["clip/tokens"].nelement() * 4


def test_cat_of_a_batchs_views_is_a_view_and_anything_else_a_copy():
    """ScoreQueries concatenates a group's images: the views of one batch, in order, come
    back as a view of that batch (no copy); other orders, other batches, gaps, copies and
    mixed dtypes are concatenated as torch.cat would."""
    batch = TensorBundle({"a": _sample((5, 3, 4), torch.float32, seed=2),
                          "b": torch.arange(10).reshape(5, 2)})
    views, copies = batch.split(copy=False), batch.split()
    other = TensorBundle({"a": _sample((2, 3, 4), torch.float32, seed=3),
                          "b": torch.arange(4).reshape(2, 2)}).split(copy=False)

    def check(items, want_view):
        got = TensorBundle.cat(items)
        for key in ("a", "b"):
            want = torch.cat([i[key] for i in items])
            assert_same(got[key], want)
            shares = got[key].untyped_storage().data_ptr() == \
                batch[key].untyped_storage().data_ptr()
            assert shares == want_view, (key, want_view)
            assert got[key].is_contiguous()

    check(views, True)
    check(views[1:4], True)  # a run inside the batch
    check(views[3:4], True)
    check([views[0], views[2]], False)  # a gap
    check([views[1], views[0]], False)  # out of order
    check(copies, False)
    check([views[3], views[4], other[0]], False)  # two batches
    two_rows = TensorBundle({"a": batch["a"][:2], "b": batch["b"][:2]})
    check([two_rows, views[2]], True)  # parts of several rows
    mixed = TensorBundle({"a": views[1]["a"].double(), "b": views[1]["b"]})
    got = TensorBundle.cat([views[0], mixed])  # torch.cat promotes; no view claims a dtype
    assert got["a"].dtype == torch.float64


def test_a_batch_whose_forward_fails_becomes_extract_error_rows(tiny, test_pipeline):
    """RunInference's dead-letter output: the images of a batch the model cannot run (here
    a wrong-sized image, as a corrupt preprocessing would give) are ``extract`` error rows,
    the other batches' features go on."""
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.core.schemas import ERRORS
    from tests.beamtest import counter, mrow
    from transforms.features import STAGE_EXTRACT, ExtractSuiteFeatures

    size = tiny.geometry.image_size
    good = [((mrow(f"q{i}", role="query"), f"sha{i}"),
             TensorBundle({"clip": torch.zeros(3, *size)})) for i in range(3)]
    bad = ((mrow("bad", role="query"), "shabad"), TensorBundle({"clip": torch.zeros(3, 5, 7)}))
    p = test_pipeline()
    out = (p | beam.Create(good + [bad])
           | ExtractSuiteFeatures(SuiteSpec(clip=tiny_spec()), batch_size=1))
    assert_that(out["features"] | "Ids" >> beam.MapTuple(lambda key, f: (
        key[0].image_id, tuple(f["clip/embeds"].shape))),
        equal_to([(f"q{i}", (1, tiny.geometry.embed_dim)) for i in range(3)]), label="Ok")
    assert_that(out[ERRORS] | "Errs" >> beam.Map(lambda e: (
        e.image_id, e.stage, e.reason.split(":")[0].isidentifier())),
        equal_to([("bad", STAGE_EXTRACT, True)]), label="Errors")
    result = p.run()
    result.wait_until_finish()
    assert counter(result, "images_failed_extract") == 1
