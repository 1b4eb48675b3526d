"""CoOp on the tiny random CLIP: the prompt assembly against open_clip's own tokenizer and
text tower, the seeded initialisation, the score, and the checkpoint.

Reference: the official PromptLearner / TextEncoder / CustomCLIP (KaiyangZhou/CoOp,
``trainers/coop.py``): prompts ``"X X … X <class>."``, the SOS embedding, the context, then
the embeddings from position 1 + M on; pooling at the argmax token; logits
``logit_scale.exp() · cos``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.backbone import BackboneSpec, get_backbone
from pipeline.model.scorers.coop import (CLASS_NAMES, CTX_STD, Coop, CoopPrompts,
                                         init_context, load_coop, load_coop_scorer,
                                         prompt_features, prompt_texts, save_coop)
from pipeline.model.scorers.saved import TrainedScorerError


def test_prompts_place_the_context_where_the_tokenizer_puts_the_placeholders(tiny):
    prompts = CoopPrompts(tiny.model, tiny.tokenizer, n_ctx=16, seed=0)
    tokens = tiny.tokenizer(prompt_texts(16, CLASS_NAMES))
    x_token = tiny.tokenizer(["X"])[0, 1]
    sot = tiny.tokenizer([""])[0, 0]
    assert torch.equal(prompts.tokens, tokens)
    assert (tokens[:, 0] == sot).all() and (tokens[:, 1:17] == x_token).all()
    # "normal." → normal + "." ; EOT right after; "anomalous" is split by CLIP's BPE
    for row, name in zip(tokens, CLASS_NAMES):
        words = tiny.tokenizer([f"{name}."])[0]
        n = int(words.argmax()) - 1  # the class tokens and "." between SOT and EOT
        assert torch.equal(row[17:17 + n], words[1:1 + n])
        assert int(row.argmax()) == 17 + n  # the EOT position the tower pools at
    emb = prompts()
    table = tiny.model.token_embedding(tokens).detach()
    assert emb.shape == (2, tokens.shape[1], tiny.model.token_embedding.weight.shape[1])
    torch.testing.assert_close(emb[:, 0], table[:, 0])
    torch.testing.assert_close(emb[:, 1:17], prompts.ctx.detach().expand(2, -1, -1))
    torch.testing.assert_close(emb[:, 17:], table[:, 17:])


def test_word_embeddings_as_context_give_open_clips_own_text_features(tiny):
    # With the context set to the token embeddings of "a photo of a", the prompts are those
    # words: our tower must give what open_clip's encode_text gives for the sentences.
    words = tiny.tokenizer(["a photo of a"])[0, 1:5]
    ctx = tiny.model.token_embedding(words).detach()
    prompts = CoopPrompts(tiny.model, tiny.tokenizer, n_ctx=4, ctx=ctx)
    ours = prompt_features(tiny.model, prompts)
    theirs = F.normalize(tiny.model.encode_text(tiny.tokenizer(
        ["a photo of a normal.", "a photo of a anomalous."])), dim=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_seeded_initialisation_is_deterministic(tiny):
    a = CoopPrompts(tiny.model, tiny.tokenizer, seed=3).ctx.detach()
    b = CoopPrompts(tiny.model, tiny.tokenizer, seed=3).ctx
    c = CoopPrompts(tiny.model, tiny.tokenizer, seed=4).ctx
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, tiny.model.token_embedding.weight.shape[1])
    assert 0.8 * CTX_STD < float(a.std()) < 1.2 * CTX_STD and abs(float(a.mean())) < 0.005
    torch.testing.assert_close(a.detach(), init_context(16, a.shape[1], 3))


def test_bad_prompt_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="two distinct classes"):
        CoopPrompts(tiny.model, tiny.tokenizer, class_names=("normal", "normal"))
    with pytest.raises(ValueError, match="at least one context"):
        CoopPrompts(tiny.model, tiny.tokenizer, n_ctx=0)
    with pytest.raises(ValueError, match="do not fit"):
        CoopPrompts(tiny.model, tiny.tokenizer, n_ctx=80)


def test_score_is_the_softmax_probability_of_anomalous_at_any_k():
    text = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    scorer = Coop(text, logit_scale=2.0)
    embeds = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    for refs in ({"embeds": torch.zeros(0, 3)}, {"embeds": torch.ones(4, 3)}):  # k = 0, 4
        assert scorer.build_memory(refs) is None
    out = scorer.score({"embeds": embeds}, None)
    scale = torch.tensor(2.0).exp()
    for i, e in enumerate(embeds):
        cos = [float(e @ t / e.norm()) for t in text]
        p = torch.softmax(scale * torch.tensor(cos), 0)[1]
        assert out.score[i].item() == pytest.approx(p.item(), rel=1e-5)
    assert out.patch_map is None and Coop.min_k == 0


def test_checkpoint_round_trip_and_backbone_check(tiny, tmp_path):
    prompts = CoopPrompts(tiny.model, tiny.tokenizer, n_ctx=8, seed=5)
    path = str(tmp_path / "coop.safetensors")
    spec = tiny.spec
    digest = save_coop(prompts, path, spec.name, spec.weights_id, tiny.geometry.embed_dim,
                       {"epochs": 2})
    ctx, meta, got = load_coop(path)
    assert got == digest and torch.equal(ctx, prompts.ctx.detach())
    assert meta["n_ctx"] == 8 and meta["class_names"] == list(CLASS_NAMES)
    assert meta["backbone"] == spec.name and meta["weights_id"] == spec.weights_id
    scorer, _, _ = load_coop_scorer(path, tiny)
    torch.testing.assert_close(scorer.text, prompt_features(tiny.model, prompts).detach())
    other = get_backbone(BackboneSpec(spec.name, "random:1"))
    with pytest.raises(TrainedScorerError, match="trained on"):
        load_coop_scorer(path, other)
    pickle = tmp_path / "x.pt"
    torch.save({"ctx": ctx}, pickle)
    with pytest.raises(TrainedScorerError, match="pickle"):
        load_coop(str(pickle))
    from pipeline.model.scorers.saved import save_trained

    bad = tmp_path / "bad.safetensors"
    save_trained(str(bad), {"ctx": torch.zeros(3, 4)}, dict(meta))
    with pytest.raises(TrainedScorerError, match="metadata says"):
        load_coop(str(bad))
