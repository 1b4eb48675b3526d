"""InCTRL's residual math as pure tensor functions (no I/O, no devices chosen here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Bound the (batch, layers, patches, k*patches) similarity block to about this many elements;
# the result is identical, only peak memory changes.
_MAX_SIM_ELEMENTS = 1 << 26


def normalize_reference_tokens(ref_tokens: torch.Tensor) -> torch.Tensor:
    """Pool k reference images' patch tokens per layer and L2-normalise them.

    ref_tokens: (k, layers, patches, width)
    returns:    (layers, k * patches, width), unit norm along width
    """
    k, layers, patches, width = ref_tokens.shape
    pooled = ref_tokens.permute(1, 0, 2, 3).reshape(layers, k * patches, width)
    return F.normalize(pooled, dim=-1)


def patch_residual_map(query_tokens: torch.Tensor, ref_unit: torch.Tensor) -> torch.Tensor:
    """Per-layer patch residuals r_l(i) = min_j ½(1 − cos(q_l,i, p_l,j)).

    query_tokens: (batch, layers, patches, width) raw tokens
    ref_unit:     (layers, k * patches, width) from ``normalize_reference_tokens``
    returns:      (batch, layers, patches)

    The minimum of ½(1 − cos) is ½(1 − max cos), so one matrix product per layer (all
    query patches of the chunk against all reference patches) and a max suffice.
    """
    b, layers, patches, _ = query_tokens.shape
    if ref_unit.shape[0] != layers or ref_unit.shape[-1] != query_tokens.shape[-1]:
        raise ValueError(
            f"query tokens {tuple(query_tokens.shape)} and references {tuple(ref_unit.shape)} "
            "disagree on layers or width"
        )
    q = F.normalize(query_tokens.to(ref_unit.dtype), dim=-1)
    per_query = layers * patches * ref_unit.shape[1]
    step = max(1, _MAX_SIM_ELEMENTS // max(per_query, 1))
    out = []
    for start in range(0, b, step):
        chunk = q[start:start + step]
        n = chunk.shape[0]
        best = torch.stack([
            # (n·P, width) @ (width, k·P): one plain GEMM per layer, then the best match
            torch.matmul(chunk[:, layer].reshape(n * patches, -1), ref_unit[layer].T)
            .amax(dim=-1).view(n, patches)
            for layer in range(layers)
        ], dim=1)  # (n, L, P)
        out.append(0.5 * (1.0 - best))
    return torch.cat(out) if out else q.new_zeros((0, layers, patches))


def patch_anomaly_map(query_tokens: torch.Tensor, ref_unit: torch.Tensor) -> torch.Tensor:
    """Mean of the per-layer residuals: (batch, patches)."""
    return patch_residual_map(query_tokens, ref_unit).mean(dim=1)


def image_residual(query_adapted: torch.Tensor, ref_adapted_mean: torch.Tensor) -> torch.Tensor:
    """In-context image residual: mean adapted reference embedding minus the adapted query.

    query_adapted:    (batch, embed_dim)
    ref_adapted_mean: (embed_dim,)
    returns:          (batch, embed_dim)
    """
    return ref_adapted_mean.unsqueeze(0) - query_adapted


def text_prior(image_embeds: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Zero-shot anomaly probability from the normal/anomalous prompt embeddings.

    image_embeds:  (batch, embed_dim), any norm
    text_features: (2, embed_dim) unit rows: [normal, anomalous]
    returns:       (batch,) softmax(100 · cos) at the anomalous side
    """
    e = F.normalize(image_embeds, dim=-1)
    logits = 100.0 * e @ text_features.to(e.dtype).T
    return logits.softmax(dim=-1)[:, 1]
