"""InCTRL's residual math as pure tensor functions (no I/O, no devices chosen here)."""
from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from pipeline.model.precision import cpu_bf16

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


# --------------------------------------------------------------- exact bf16 products
#
# Tokens from a bf16 image tower (``--precision bf16`` on the CPU) are bfloat16 values held in
# float32: every value has 8 significant bits. The product of two such values is exact in
# float32 (16 significant bits ≤ 24), so a matrix product whose inputs are rounded to bf16
# (a no-op for them) and whose products are summed in float32 computes exactly what a float32
# GEMM computes, up to the order of the float32 sums. oneDNN does that on the CPU's bf16
# units (AMX, AVX512-BF16) when torch's fp32 matmul precision for it is "bf16": about 3x the
# float32 GEMM here (bench/RESULTS.md, "the patch residual on bf16 units"). Normalised tokens are not
# bf16 values, so this path takes the raw tokens and divides by the norms afterwards.
# Float32 tokens (an fp32 run) never take it: their results stay bit for bit what they were.

_LOW_HALF = 0 if sys.byteorder == "little" else 1  # where a float32's low 16 bits sit
_NORMALIZE_EPS = 1e-12  # F.normalize's default
_MATMUL_PRECISION_LOCK = threading.Lock()


def exact_bf16_products_available(device: torch.device) -> bool:
    """Whether float32 GEMMs can run on bf16 units with float32 sums here: a CPU with
    native bf16, a torch whose oneDNN matmul precision can be set, oneDNN present."""
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and mm is not None and hasattr(mm, "fp32_precision") and cpu_bf16().native)


def all_bf16_values(x: torch.Tensor) -> bool:
    """Whether every value of float32 ``x`` is a bfloat16 value: its low 16 bits are zero.

    Read as the low int16 half of each value, a strided view (no copy): counting its nonzeros
    is one pass, about 5x cheaper than masking the int32 bits (1.3 against 7.4 ms for a batch
    of 8 ViT-B-16-plus-240 query tokens here)."""
    if x.dtype != torch.float32:
        return False
    if x.dim() == 0 or x.stride(-1) != 1:  # a dtype view needs unit stride last
        x = x.contiguous().reshape(-1)
    low = x.view(torch.int16)[..., _LOW_HALF::2]
    return not bool(torch.count_nonzero(low))


@contextlib.contextmanager
def _bf16_float32_products() -> Iterator[None]:
    """Float32 matrix products in this block run on bf16 units with float32 sums.

    torch keeps this setting per process: the lock keeps two blocks from interleaving their
    restores. Only for inputs ``all_bf16_values`` accepts, where it changes no product."""
    mm = torch.backends.mkldnn.matmul
    with _MATMUL_PRECISION_LOCK:
        before = mm.fp32_precision
        mm.fp32_precision = "bf16"
        try:
            yield
        finally:
            mm.fp32_precision = before


@dataclass(frozen=True)
class Bf16Rows:
    """Reference patch tokens whose values are all bfloat16 values, kept raw for the exact
    bf16-product path of ``patch_residual_map``.

    raw:      (layers, k * patches, width) bfloat16 (the same values, half the memory of
              float32 beside ``ReferenceSet.tokens_unit``)
    inv_norm: (layers, k * patches) float32, 1 / max(‖row‖, eps) as ``F.normalize`` divides
    """

    raw: torch.Tensor
    inv_norm: torch.Tensor


def bf16_reference_rows(ref_tokens: torch.Tensor) -> Bf16Rows | None:
    """``Bf16Rows`` of k references' tokens where the exact bf16 path applies (all values
    bf16 values, a CPU with bf16 units), None otherwise.

    ref_tokens: (k, layers, patches, width) raw tokens
    """
    if not (exact_bf16_products_available(ref_tokens.device) and all_bf16_values(ref_tokens)):
        return None
    k, layers, patches, width = ref_tokens.shape
    raw = ref_tokens.permute(1, 0, 2, 3).reshape(layers, k * patches, width)
    return Bf16Rows(raw.to(torch.bfloat16).contiguous(), _inverse_norm(raw))


def _inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / max(‖x‖₂, eps) over the last dimension, ``F.normalize``'s divisor."""
    return 1.0 / x.norm(dim=-1).clamp_min(_NORMALIZE_EPS)


def patch_residual_map(query_tokens: torch.Tensor, ref_unit: torch.Tensor,
                       ref_bf16: Bf16Rows | None = None) -> torch.Tensor:
    """Per-layer patch residuals r_l(i) = min_j ½(1 − cos(q_l,i, p_l,j)).

    query_tokens: (batch, layers, patches, width) raw tokens
    ref_unit:     (layers, k * patches, width) from ``normalize_reference_tokens``
    ref_bf16:     the same references from ``bf16_reference_rows``, or None
    returns:      (batch, layers, patches)

    The minimum of ½(1 − cos) is ½(1 − max cos), so one matrix product per layer (all
    query patches of the chunk against all reference patches) and a max suffice. With
    ``ref_bf16`` and queries whose values are all bf16 values, the products are the raw
    tokens' dot products on bf16 units (exact products, float32 sums), scaled by both
    inverse norms: the same cosines to float32 rounding, about 3x faster on such a CPU.
    """
    b, layers, patches, _ = query_tokens.shape
    if ref_unit.shape[0] != layers or ref_unit.shape[-1] != query_tokens.shape[-1]:
        raise ValueError(
            f"query tokens {tuple(query_tokens.shape)} and references {tuple(ref_unit.shape)} "
            "disagree on layers or width"
        )
    if ref_bf16 is not None and ref_bf16.raw.shape != ref_unit.shape:
        raise ValueError(f"bf16 reference rows {tuple(ref_bf16.raw.shape)} are not the "
                         f"references {tuple(ref_unit.shape)}")
    exact_bf16 = ref_bf16 is not None and all_bf16_values(query_tokens)
    per_query = layers * patches * ref_unit.shape[1]
    step = max(1, _MAX_SIM_ELEMENTS // max(per_query, 1))
    out = []
    for start in range(0, b, step):
        if exact_bf16:
            best = _best_cosines_bf16(query_tokens[start:start + step], ref_bf16)
        else:
            best = _best_cosines(F.normalize(query_tokens[start:start + step]
                                             .to(ref_unit.dtype), dim=-1), ref_unit)
        out.append(0.5 * (1.0 - best))
    return torch.cat(out) if out else query_tokens.new_zeros((0, layers, patches),
                                                            dtype=ref_unit.dtype)


def _best_cosines(q_unit: torch.Tensor, ref_unit: torch.Tensor) -> torch.Tensor:
    """max_j cos(q_l,i, p_l,j) for unit rows: (n, layers, patches, width) against
    (layers, k·P, width) → (n, layers, patches)."""
    n, layers, patches, _ = q_unit.shape
    return torch.stack([
        # (n·P, width) @ (width, k·P): one plain GEMM per layer, then the best match
        torch.matmul(q_unit[:, layer].reshape(n * patches, -1), ref_unit[layer].T)
        .amax(dim=-1).view(n, patches)
        for layer in range(layers)
    ], dim=1)


def _best_cosines_bf16(q_raw: torch.Tensor, ref: Bf16Rows) -> torch.Tensor:
    """``_best_cosines`` from raw tokens whose values are all bf16 values:
    max_j (q·p_j / ‖p_j‖) / ‖q‖, the dot products on bf16 units (exact products, float32
    sums). (n, layers, patches, width) → (n, layers, patches)."""
    n, layers, patches, _ = q_raw.shape
    inv_q = _inverse_norm(q_raw)  # (n, L, P)
    best = []
    with _bf16_float32_products():
        for layer in range(layers):
            dots = torch.matmul(q_raw[:, layer].reshape(n * patches, -1),
                                ref.raw[layer].float().T)
            dots.mul_(ref.inv_norm[layer])  # (n·P, k·P): cos · ‖q‖
            best.append(dots.amax(dim=-1).view(n, patches))
    return torch.stack(best, dim=1) * inv_q


def patch_anomaly_map(query_tokens: torch.Tensor, ref_unit: torch.Tensor,
                      ref_bf16: Bf16Rows | None = None) -> torch.Tensor:
    """Mean of the per-layer residuals: (batch, patches)."""
    return patch_residual_map(query_tokens, ref_unit, ref_bf16).mean(dim=1)


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
