"""pipeline.model.inctrl: the scorer on real (synthetic) images through the tiny backbone and
on random features checked against the paper's loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.backbone import ImageFeatures, get_backbone, tiny_spec
from pipeline.model.heads import InCTRLHeads
from pipeline.model.inctrl import InCTRLModel, ReferenceSet, build_text_features
from pipeline.model.prompts import prompts_for
from pipeline.model.residual import exact_bf16_products_available
from pipeline.model.checkpoint import import_official_checkpoint
from tests.model.helpers import (
    geometry,
    official_adapter,
    official_head,
    official_state,
    paste_square,
    residual_loop,
    texture,
)


def _stack(backbone, images):
    """Images through the backbone's own transform, stacked: (n, 3, H, W)."""
    return torch.stack([backbone.preprocess(im) for im in images])

COMPONENTS = ("final", "fine", "holistic", "image_residual", "text_prior", "patch_map")
DEFECT = dict(top=24, left=8, side=16)  # covers patches rows 3-4, cols 1-2 of the 8x8 grid


@pytest.fixture(scope="module")
def images():
    refs = [texture(s) for s in range(4)]
    clean = texture(10)
    return {"refs": refs, "clean": clean, "defect": paste_square(clean, **DEFECT),
            "others": [texture(s) for s in (20, 21, 22)]}


@pytest.fixture(scope="module")
def feats(tiny, images):
    enc = lambda ims: tiny.encode_images(_stack(tiny, ims))  # noqa: E731
    return {"refs": enc(images["refs"]),
            "queries": enc([images["refs"][2], images["clean"], images["defect"]]),
            "others": enc(images["others"])}


@pytest.fixture(scope="module")
def text(tiny):
    return build_text_features(tiny, "wood")


@pytest.fixture(scope="module")
def heads(tiny):
    g = tiny.geometry
    return InCTRLHeads.seeded(g.embed_dim, g.num_patches, seed=0).eval()


def _same(a, b, atol=0.0):
    for name in COMPONENTS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0,
                                   equal_nan=True, msg=name)


def test_query_identical_to_a_reference_scores_zero(tiny, feats, text):
    scorer = InCTRLModel(tiny.geometry).eval()
    out = scorer(feats["queries"], scorer.prepare_references(feats["refs"]), text)
    assert abs(out.fine[0].item()) < 1e-5
    assert out.patch_map[0].abs().max() < 1e-5


def test_pasted_defect_scores_higher_and_is_located(tiny, feats, text):
    scorer = InCTRLModel(tiny.geometry).eval()
    out = scorer(feats["queries"], scorer.prepare_references(feats["refs"]), text)
    identical, clean, defect = out.fine.tolist()
    assert identical < clean < defect
    assert defect > clean + 0.1
    grid = tiny.geometry.grid
    p = tiny.geometry.patch_size[0]
    rows = range(DEFECT["top"] // p, (DEFECT["top"] + DEFECT["side"]) // p)
    cols = range(DEFECT["left"] // p, (DEFECT["left"] + DEFECT["side"]) // p)
    row, col = divmod(out.patch_map[2].argmax().item(), grid[1])
    assert row in rows and col in cols


def test_fine_and_map_follow_the_paper_loop_on_real_features(tiny, feats, text):
    scorer = InCTRLModel(tiny.geometry).eval()
    out = scorer(feats["queries"], scorer.prepare_references(feats["refs"]), text)
    _, want_map, want_fine = residual_loop(feats["queries"].tokens, feats["refs"].tokens)
    torch.testing.assert_close(out.patch_map.double(), want_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.fine.double(), want_fine, atol=1e-5, rtol=0)


@pytest.mark.skipif(not exact_bf16_products_available(torch.device("cpu")),
                    reason="a bf16 run on the CPU needs native bf16")
def test_bf16_tower_tokens_score_through_the_bf16_path_like_the_paper_loop(images, text):
    # A bf16 run: the tiny tower in bf16 gives bf16-valued tokens, so the prepared
    # references carry their raw rows and the patch residual takes the exact bf16-product
    # path; it must still be the paper's min_j ½(1 − cos) of those tokens (float64 loop).
    tiny16 = get_backbone(tiny_spec(precision="bf16"))
    enc = lambda ims: tiny16.encode_images(_stack(tiny16, ims))  # noqa: E731
    refs_f, queries_f = enc(images["refs"]), enc([images["clean"], images["defect"]])
    scorer = InCTRLModel(tiny16.geometry).eval()
    refs = scorer.prepare_references(refs_f)
    assert refs.tokens_bf16 is not None
    out = scorer(queries_f, refs, text)
    _, want_map, want_fine = residual_loop(queries_f.tokens, refs_f.tokens)
    torch.testing.assert_close(out.patch_map.double(), want_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.fine.double(), want_fine, atol=1e-6, rtol=0)
    assert out.fine[1] > out.fine[0]  # the pasted defect still scores higher


def test_fp32_references_carry_no_bf16_rows(tiny, feats):
    assert InCTRLModel(tiny.geometry).prepare_references(feats["refs"]).tokens_bf16 is None


def test_with_heads_final_is_mean_of_holistic_and_fine(tiny, feats, text, heads):
    scorer = InCTRLModel(tiny.geometry, heads).eval()
    refs = scorer.prepare_references(feats["refs"])
    out = scorer(feats["queries"], refs, text)
    torch.testing.assert_close(out.final, (out.holistic + out.fine) / 2)

    # Every component recomputed from its definition.
    q = feats["queries"]
    ref_mean = heads.adapter(feats["refs"].embeds).mean(dim=0)
    torch.testing.assert_close(refs.adapted_mean, ref_mean)
    img = heads.image_head(ref_mean - heads.adapter(q.embeds))
    e = F.normalize(q.embeds, dim=-1)
    prior = torch.softmax(100 * torch.stack([e @ text[0], e @ text[1]], dim=1), dim=1)[:, 1]
    holistic = heads.holistic_head(out.patch_map + prior[:, None] + img[:, None])
    torch.testing.assert_close(out.image_residual, img)
    torch.testing.assert_close(out.text_prior, prior)
    torch.testing.assert_close(out.holistic, holistic)
    assert torch.isfinite(out.final).all()


def test_without_heads_final_is_fine_and_head_scores_are_nan(tiny, feats, text):
    scorer = InCTRLModel(tiny.geometry).eval()
    assert not scorer.has_heads
    refs = scorer.prepare_references(feats["refs"])
    assert refs.adapted_mean is None
    out = scorer(feats["queries"], refs, text)
    assert torch.equal(out.final, out.fine)
    assert torch.isnan(out.holistic).all() and torch.isnan(out.image_residual).all()
    e = F.normalize(feats["queries"].embeds, dim=-1)
    prior = torch.softmax(100 * torch.stack([e @ text[0], e @ text[1]], dim=1), dim=1)[:, 1]
    torch.testing.assert_close(out.text_prior, prior)


@pytest.mark.parametrize("with_heads", [False, True])
def test_every_component_has_batch_shape(tiny, feats, text, heads, with_heads):
    scorer = InCTRLModel(tiny.geometry, heads if with_heads else None).eval()
    out = scorer(feats["queries"], scorer.prepare_references(feats["refs"]), text)
    batch = len(feats["queries"])
    for name in COMPONENTS[:-1]:
        assert getattr(out, name).shape == (batch,), name
    assert out.patch_map.shape == (batch, tiny.geometry.num_patches)


@pytest.mark.parametrize("with_heads", [False, True])
def test_batch_equals_each_query_alone(tiny, feats, text, heads, with_heads):
    scorer = InCTRLModel(tiny.geometry, heads if with_heads else None).eval()
    refs = scorer.prepare_references(feats["refs"])
    queries = ImageFeatures.cat([feats["queries"], feats["others"]])
    batch = scorer(queries, refs, text)
    singles = [scorer(queries[i], refs, text) for i in range(len(queries))]
    for name in COMPONENTS:
        got = torch.cat([getattr(s, name) for s in singles])
        torch.testing.assert_close(got, getattr(batch, name), atol=1e-6, rtol=0,
                                   equal_nan=True, msg=name)


def _clone(refs: ReferenceSet) -> ReferenceSet:
    return ReferenceSet(refs.tokens_unit.clone(), refs.embeds.clone(),
                        None if refs.adapted_mean is None else refs.adapted_mean.detach().clone(),
                        refs.k)


@pytest.mark.parametrize("with_heads", [False, True])
def test_prepared_references_are_reused_unchanged(tiny, feats, text, heads, with_heads):
    scorer = InCTRLModel(tiny.geometry, heads if with_heads else None).eval()
    refs = scorer.prepare_references(feats["refs"])
    before = _clone(refs)
    assert refs.k == 4
    assert refs.tokens_unit.shape == (3, 4 * 64, 64)

    out_a = scorer(feats["queries"], refs, text)
    out_b = scorer(feats["others"], refs, text)  # second batch, same ReferenceSet

    for name in ("tokens_unit", "embeds", "adapted_mean"):
        a, b = getattr(refs, name), getattr(before, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    fresh = scorer.prepare_references(feats["refs"])
    _same(out_b, scorer(feats["others"], fresh, text))
    _same(out_a, scorer(feats["queries"], fresh, text))
    # Preparing references sees only the references: same features, same set.
    assert torch.equal(fresh.tokens_unit, refs.tokens_unit)


def test_empty_reference_set_is_refused(tiny):
    scorer = InCTRLModel(tiny.geometry)
    with pytest.raises(ValueError, match="at least one"):
        scorer.prepare_references(ImageFeatures(torch.zeros(0, 3, 64, 64), torch.zeros(0, 32)))


@pytest.mark.parametrize("k", [1, 16])
def test_scorer_on_random_features_equals_loop(k):
    geo = geometry(embed_dim=8, grid=(3, 3), width=16, blocks=(1, 2))
    g = torch.Generator().manual_seed(k)
    q = ImageFeatures(torch.randn(3, 2, 9, 16, generator=g), torch.randn(3, 8, generator=g))
    r = ImageFeatures(torch.randn(k, 2, 9, 16, generator=g), torch.randn(k, 8, generator=g))
    text = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    scorer = InCTRLModel(geo).eval()
    out = scorer(q, scorer.prepare_references(r), text)
    _, want_map, want_fine = residual_loop(q.tokens, r.tokens)
    torch.testing.assert_close(out.patch_map.double(), want_map, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.fine.double(), want_fine, atol=1e-5, rtol=0)


@pytest.mark.parametrize("category", ["metal_nut", "dog"])
def test_text_features_are_normalised_ensemble_means(tiny, category):
    got = build_text_features(tiny, category)
    assert got.shape == (2, tiny.geometry.embed_dim)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    model, tok = tiny.model, tiny.tokenizer
    with torch.no_grad():
        for side, texts in enumerate(prompts_for(category)):
            emb = F.normalize(model.encode_text(tok(texts)), dim=-1)
            torch.testing.assert_close(got[side], F.normalize(emb.mean(dim=0), dim=0),
                                       atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("k", [1, 5])
def test_scores_equal_the_official_forward_by_hand(tmp_path, k):
    """Every score against InCTRL's forward written out from a raw official state dict."""
    embed, grid, width = 16, (3, 3), 16
    state = official_state(embed, grid[0] * grid[1], seed=k, scale=0.15)
    torch.save({"model_state": state}, tmp_path / "official.pyth")
    scorer = InCTRLModel(geometry(embed, grid, width),
                          import_official_checkpoint(str(tmp_path / "official.pyth"))).eval()
    g = torch.Generator().manual_seed(10 + k)
    q = ImageFeatures(torch.randn(4, 2, 9, width, generator=g), torch.randn(4, embed, generator=g))
    r = ImageFeatures(torch.randn(k, 2, 9, width, generator=g) * 2,
                      torch.randn(k, embed, generator=g) * 2)
    text = F.normalize(torch.randn(2, embed, generator=g), dim=-1)
    text[1] = F.normalize(text[0] + 0.05 * torch.randn(embed, generator=g), dim=0)

    out = scorer(q, scorer.prepare_references(r), text)

    token_ref = official_adapter(state, r.embeds).mean(dim=0) - official_adapter(state, q.embeds)
    img = official_head(state, "diff_head_ref", token_ref)
    e = F.normalize(q.embeds.double(), dim=-1)
    prior = torch.softmax(100 * e @ text.double().T, dim=-1)[:, 1]
    _, amap, fine = residual_loop(q.tokens, r.tokens)
    holistic = official_head(state, "diff_head", prior[:, None] + img[:, None] + amap)
    final = (holistic + fine) / 2
    for name, want in (("image_residual", img), ("text_prior", prior), ("patch_map", amap),
                       ("fine", fine), ("holistic", holistic), ("final", final)):
        torch.testing.assert_close(getattr(out, name).double(), want, atol=1e-5, rtol=1e-4,
                                   msg=name)
    for v in (img, holistic):  # the heads are neither saturated nor constant
        assert 0.01 < v.min() and v.max() < 0.99 and v.std() > 1e-4
