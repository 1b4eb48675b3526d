"""The text tower on the prompts' shortest prefix gives what ``encode_text`` gives."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.model.prompts import DEFAULT_SEMANTIC_CLASSES, prompts_for
from pipeline.model.text import encode_text_prefix, prefix_applies


@pytest.fixture(scope="module")
def ensemble() -> list[str]:
    normal, anomalous = prompts_for("widget", DEFAULT_SEMANTIC_CLASSES)
    return normal + anomalous


def test_prefix_matches_encode_text_on_the_whole_ensemble(tiny, ensemble):
    tokens = tiny.tokenizer(ensemble)
    lengths: list[int] = []  # sequence lengths the text transformer is run on
    with torch.no_grad():
        full = tiny.model.encode_text(tokens)
        hook = tiny.model.transformer.register_forward_pre_hook(
            lambda _module, args: lengths.append(args[0].shape[1]))
        try:
            short = encode_text_prefix(tiny.model, tokens)
        finally:
            hook.remove()
    assert short.shape == full.shape == (len(ensemble), tiny.geometry.embed_dim)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    # It really ran on the prefix: up to the last end-of-text token, far short of 77.
    assert lengths == [int(tokens.argmax(dim=-1).max()) + 1]
    assert lengths[0] < tokens.shape[1] // 2


def test_each_prompt_is_independent_of_its_batch(tiny, ensemble):
    """A short prompt encoded alone (short prefix) equals the same prompt in a long batch."""
    long_prompt = " ".join(["a photo of a flawless widget"] * 8) + "."
    tokens = tiny.tokenizer([ensemble[0], long_prompt])
    with torch.no_grad():
        together = encode_text_prefix(tiny.model, tokens)
        alone = encode_text_prefix(tiny.model, tiny.tokenizer([ensemble[0]]))
        full = tiny.model.encode_text(tokens)
    torch.testing.assert_close(alone[0], together[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together, full, rtol=1e-5, atol=1e-5)


def test_a_prompt_filling_the_context_uses_all_of_it(tiny):
    tokens = tiny.tokenizer([" ".join(["widget"] * 200)])  # truncated to 77, EOT last
    assert int(tokens.argmax(dim=-1)) == tokens.shape[1] - 1
    with torch.no_grad():
        torch.testing.assert_close(encode_text_prefix(tiny.model, tokens),
                                   tiny.model.encode_text(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["pooling", "mask"])
def test_other_towers_go_through_encode_text(tiny, ensemble, change):
    model = copy.deepcopy(tiny.model)  # the session's backbone stays untouched
    if change == "pooling":
        model.text_pool_type = "last"
    else:  # a bidirectional tower: later tokens matter, no prefix may be cut
        model.attn_mask = torch.zeros_like(model.attn_mask)
    assert not prefix_applies(model)
    calls = []
    real = model.encode_text
    model.encode_text = lambda t: calls.append(t) or real(t)
    tokens = tiny.tokenizer(ensemble[:3])
    with torch.no_grad():
        out = encode_text_prefix(model, tokens)
        expected = real(tokens)
    assert len(calls) == 1 and calls[0].shape[1] == tokens.shape[1]
    assert torch.equal(out, expected)


def test_applies_to_the_shipped_tiny_backbone(tiny):
    assert prefix_applies(tiny.model)

