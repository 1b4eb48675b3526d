"""Reference implementations written straight from the paper / the official InCTRL code.

They are deliberately slow and literal (Python loops, raw state dicts) so the vectorised
code under test can be checked against them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from pipeline.model.backbone import Geometry


def geometry(embed_dim: int = 8, grid: tuple[int, int] = (3, 3), width: int = 16,
             blocks: tuple[int, ...] = (1, 2)) -> Geometry:
    """A hand-sized geometry for scorer tests on random features."""
    return Geometry(image_size=(grid[0] * 4, grid[1] * 4), patch_size=(4, 4), grid=grid,
                    token_width=width, embed_dim=embed_dim, depth=max(blocks), blocks=blocks)


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def residual_loop(query: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InCTRL's patch residual, one patch pair at a time.

    query: (batch, layers, patches, width) raw tokens; refs: (k, layers, patches_ref, width)
    For every layer l and query patch i: r_l(i) = min over all k * patches_ref reference
    patches j of ½(1 − cos(q_l,i, p_l,j)). Map = mean over layers; fine = max over patches.
    returns (per-layer residuals (B, L, P), map (B, P), fine (B,)), float64
    """
    q, r = query.double().tolist(), refs.double().tolist()
    batch, layers, patches = len(q), query.shape[1], query.shape[2]
    per_layer = torch.zeros(batch, layers, patches, dtype=torch.float64)
    for b in range(batch):
        for l in range(layers):
            for i in range(patches):
                best = math.inf
                for ref in r:  # k reference images
                    for p in ref[l]:  # their patches
                        best = min(best, 0.5 * (1.0 - _cos(q[b][l][i], p)))
                per_layer[b, l, i] = best
    amap = per_layer.mean(dim=1)
    return per_layer, amap, amap.max(dim=1).values


def official_head(state: dict, prefix: str, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
    """Official TransformerBasicHead.forward (eval) from raw weights:
    Linear → ReLU → bn2 → Linear → ReLU → bn3 → Linear → sigmoid. Its bn1 is never used.
    """
    def lin(name, v):
        return v @ state[f"{prefix}.{name}.weight"].double().T + state[f"{prefix}.{name}.bias"].double()

    def bn(name, v):
        g = lambda s: state[f"{prefix}.{name}.{s}"].double()  # noqa: E731
        return (v - g("running_mean")) / torch.sqrt(g("running_var") + 1e-5) * g("weight") + g("bias")

    v = x.double()
    v = bn("bn2", torch.relu(lin("projection1", v)))
    v = bn("bn3", torch.relu(lin("projection2", v)))
    v = lin("projection3", v)[:, 0]
    return v if logits else torch.sigmoid(v)


def official_adapter(state: dict, x: torch.Tensor, prefix: str = "adapter") -> torch.Tensor:
    """Official Adapter: Linear(no bias) → ReLU → Linear(no bias) → ReLU."""
    w0, w2 = state[f"{prefix}.fc.0.weight"].double(), state[f"{prefix}.fc.2.weight"].double()
    return torch.relu(torch.relu(x.double() @ w0.T) @ w2.T)


def official_state(embed_dim: int, patches: int, seed: int = 0, prefix: str = "",
                   scale: float = 0.3, towers: dict | None = None) -> dict:
    """A small state dict in the official InCTRL layout: adapter and heads, plus the CLIP
    model's own keys ``towers`` (fake tower keys of no real model when not given)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=scale):
        return torch.randn(*shape, generator=g) * scale

    s = {
        "adapter.fc.0.weight": rnd(embed_dim // 4, embed_dim),
        "adapter.fc.2.weight": rnd(embed_dim, embed_dim // 4),
    }
    for head, n in (("diff_head", patches), ("diff_head_ref", embed_dim)):
        for name, (o, i) in (("projection1", (128, n)), ("projection2", (64, 128)),
                             ("projection3", (1, 64))):
            s[f"{head}.{name}.weight"] = rnd(o, i)
            s[f"{head}.{name}.bias"] = rnd(o)
        for name, m in (("bn1", n), ("bn2", 128), ("bn3", 64)):
            s[f"{head}.{name}.weight"] = 0.5 + torch.rand(m, generator=g)
            s[f"{head}.{name}.bias"] = rnd(m)
            s[f"{head}.{name}.running_mean"] = rnd(m)
            s[f"{head}.{name}.running_var"] = 0.5 + torch.rand(m, generator=g)
            s[f"{head}.{name}.num_batches_tracked"] = torch.tensor(17)
    if towers is None:
        towers = {  # CLIP tower keys that the heads import must ignore
            "visual.conv1.weight": rnd(8, 3, 4, 4),
            "visual.transformer.resblocks.0.attn.in_proj_weight": rnd(24, 8),
            "token_embedding.weight": rnd(10, 8),
            "text_projection": rnd(8, 8),
            "logit_scale": torch.tensor(4.6),
        }
    s.update(towers)
    return {prefix + k: v for k, v in s.items()}


def perturbed(state: dict, seed: int, scale: float = 0.05) -> dict:
    """A copy of a model state dict with seeded noise on every floating-point tensor: towers
    with known weights that no seeded random initialisation gives."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            spread = float(v.std()) if v.numel() > 1 else 1.0
            v = v + torch.randn(v.shape, generator=g, dtype=v.dtype) * scale * (spread + 0.1)
        out[k] = v.detach().clone()
    return out


def texture(seed: int, size: int = 64) -> Image.Image:
    """A periodic texture with a little seeded noise: a 'normal' image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.25 * np.sin(2 * np.pi * x / 8) * np.cos(2 * np.pi * y / 8)
    img = np.stack([0.9 * base, 0.7 * base, 0.5 * base], axis=-1)
    img = img + rng.normal(0.0, 0.03, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def paste_square(image: Image.Image, top: int, left: int, side: int) -> Image.Image:
    """A copy of ``image`` with a bright white square: a synthetic defect."""
    a = np.array(image).copy()
    a[top:top + side, left:left + side] = 255
    return Image.fromarray(a)
