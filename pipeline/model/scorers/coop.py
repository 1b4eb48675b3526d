"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022) as an
anomaly baseline: two classes, "normal" and "anomalous", one learned context.

Prompt. M learnable context vectors (the paper: 16), shared by both classes (CoOp's
"generic context", ``CSC=False``), stand in front of each class name, the class token at the
end (``CLASS_TOKEN_POSITION="end"``): ``[SOS] v₁ … v_M <class tokens> . [EOS]``. As the
official PromptLearner (KaiyangZhou/CoOp, ``trainers/coop.py``) does, the prompt
``"X X … X <class>."`` is tokenised with CLIP's own tokenizer; its token embeddings are
kept except at positions 1 … M, which take the context vectors; the end-of-text position
(the argmax of the token ids) is where the text tower pools. The text tower (token
positions, transformer, final LayerNorm, projection) is CLIP's own, frozen
(``pipeline.model.text.encode_token_embeddings``). The context starts from N(0, 0.02²),
drawn from a seeded generator.

Score. The image's CLIP embedding (``embeds``, the pooled projected image feature InCTRL's
extractor already produces) and the two prompt embeddings, both L2-normalised, give logits
``exp(logit_scale)·cos`` (CLIP's learned temperature); the image score is the softmax
probability of "anomalous". Scoring needs no references: it works at k = 0 and ignores any
k references it is given. Training (``pipeline.train.coop``) is cross-entropy on labelled
auxiliary images with both towers frozen.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.scorers.base import Features, Models, Option, ScorerEntry, ScorerOutput
from pipeline.model.shared import shared

DEFAULT_N_CTX = 16  # the paper's M
CLASS_NAMES = ("normal", "anomalous")  # class 0, class 1 (the anomaly score)
CTX_STD = 0.02  # the paper's initialisation
PLACEHOLDER = "X"  # CoOp's context placeholder word
COOP_FORMAT = "coop/1"
_WHAT = "CoOp checkpoint"


def prompt_texts(n_ctx: int, class_names: Sequence[str]) -> list[str]:
    """``"X X … X <class>."`` per class (CoOp's prompt_prefix + " " + name + ".")."""
    prefix = " ".join([PLACEHOLDER] * n_ctx)
    return [f"{prefix} {name.replace('_', ' ')}." for name in class_names]


def init_context(n_ctx: int, width: int, seed: int) -> torch.Tensor:
    """(n_ctx, width) drawn from N(0, 0.02²) with a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_ctx, width, generator=gen) * CTX_STD


class CoopPrompts(nn.Module):
    """The learned context (``ctx``, the only parameter) and the fixed token embeddings
    around it, for one CLIP model and its tokenizer.

    tokens: (C, L) the prompt token ids; prefix: (C, 1, W) start-of-text embeddings;
    suffix: (C, L − 1 − M, W) class tokens, full stop, end of text and padding.
    forward() → (C, L, W) the prompts' token embeddings.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 n_ctx: int = DEFAULT_N_CTX, class_names: Sequence[str] = CLASS_NAMES,
                 seed: int = 0, ctx: torch.Tensor | None = None) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"CoOp needs at least one context vector, got {n_ctx}")
        if len(class_names) != 2 or len(set(class_names)) != 2 or not all(
                n.strip() for n in class_names):
            raise ValueError(f"CoOp scores two distinct classes (normal, anomalous), got "
                             f"{list(class_names)}")
        self.n_ctx = n_ctx
        self.class_names = tuple(class_names)
        tokens = tokenizer(prompt_texts(n_ctx, class_names))
        embedding = clip_model.token_embedding
        width = embedding.weight.shape[1]
        placeholder = tokenizer([PLACEHOLDER])[0, 1]
        if not bool((tokens[:, 1:1 + n_ctx] == placeholder).all()):
            raise ValueError(f"{n_ctx} context tokens and the class names do not fit CLIP's "
                             f"context of {tokens.shape[1]} tokens")
        with torch.no_grad():
            emb = embedding(tokens.to(embedding.weight.device)).float()
        self.register_buffer("tokens", tokens.to(embedding.weight.device), persistent=False)
        self.register_buffer("prefix", emb[:, :1], persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:], persistent=False)
        if ctx is None:
            ctx = init_context(n_ctx, width, seed)
        if tuple(ctx.shape) != (n_ctx, width):
            raise ValueError(f"context of shape {tuple(ctx.shape)}; this model needs "
                             f"({n_ctx}, {width})")
        self.ctx = nn.Parameter(ctx.detach().clone().float().to(embedding.weight.device))

    def forward(self) -> torch.Tensor:
        c = self.prefix.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(c, -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


def prompt_features(clip_model: nn.Module, prompts: CoopPrompts) -> torch.Tensor:
    """(C, D) L2-normalised text embeddings of the prompts through CLIP's frozen text tower."""
    from pipeline.model.text import encode_token_embeddings

    return F.normalize(encode_token_embeddings(clip_model, prompts(), prompts.tokens).float(),
                       dim=-1)


def coop_logits(embeds: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float
                ) -> torch.Tensor:
    """(B, C) CLIP logits: exp(logit_scale) · cos(image, prompt).

    embeds: (B, D) image embeddings (any norm); text: (C, D) L2-normalised."""
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=embeds.device).exp()
    return scale * F.normalize(embeds.float(), dim=-1) @ text.T


class Coop:
    """CoOp's scorer on the CLIP extractor's ``embeds`` (B, D).

    build_memory(references) → None (references are not used; any k, including 0)
    score(queries, memory)   → score (B,) P("anomalous"), no patch map,
                               components {"logit_margin": (B,) anomalous − normal logit}
    """

    name = "coop"
    min_k = 0
    uses_pooled = False

    def __init__(self, text: torch.Tensor, logit_scale: float) -> None:
        if text.dim() != 2 or text.shape[0] != 2:
            raise ValueError(f"CoOp needs (2, D) prompt embeddings, got {tuple(text.shape)}")
        self.text = text
        self.logit_scale = float(logit_scale)

    def build_memory(self, references: Features, context=None) -> None:
        return None

    def score(self, queries: Features, memory: Any = None) -> ScorerOutput:
        embeds = queries["embeds"]
        logits = coop_logits(embeds, self.text.to(embeds.device), self.logit_scale)
        prob = logits.softmax(dim=-1)[:, 1]
        return ScorerOutput(prob, None, {"logit_margin": logits[:, 1] - logits[:, 0]})


# --------------------------------------------------------------------------------------------
# Checkpoint: the context vectors with their metadata
# --------------------------------------------------------------------------------------------


def coop_metadata(prompts: CoopPrompts, backbone: str, weights_id: str, embed_dim: int,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": COOP_FORMAT, "backbone": backbone, "weights_id": weights_id,
        "n_ctx": prompts.n_ctx, "ctx_dim": int(prompts.ctx.shape[1]), "embed_dim": embed_dim,
        "class_names": list(prompts.class_names),
        "prompts": prompt_texts(prompts.n_ctx, prompts.class_names),
        "init_std": CTX_STD, "extra": dict(extra or {}),
    }


def save_coop(prompts: CoopPrompts, path: str, backbone: str, weights_id: str, embed_dim: int,
              extra: dict[str, Any] | None = None) -> str:
    """Write the context vectors (``ctx``) with ``coop_metadata``; returns the file's hash."""
    from pipeline.model.scorers.saved import save_trained

    meta = coop_metadata(prompts, backbone, weights_id, embed_dim, extra)
    return save_trained(path, {"ctx": prompts.ctx}, meta)


def load_coop(path: str) -> tuple[torch.Tensor, dict[str, Any], str]:
    """(context (M, W), metadata, content hash) of a file from ``save_coop``."""
    from pipeline.model.scorers.saved import TrainedScorerError, load_trained, require

    tensors, meta, digest = load_trained(path, COOP_FORMAT, _WHAT)
    require(meta, ("backbone", "weights_id", "n_ctx", "ctx_dim", "class_names"), path, _WHAT)
    ctx = tensors.get("ctx")
    if ctx is None or set(tensors) != {"ctx"}:
        raise TrainedScorerError(f"{path}: a {_WHAT} holds exactly one tensor 'ctx', found "
                                 f"{sorted(tensors)}")
    if tuple(ctx.shape) != (int(meta["n_ctx"]), int(meta["ctx_dim"])):
        raise TrainedScorerError(f"{path}: context of shape {tuple(ctx.shape)}, its metadata "
                                 f"says ({meta['n_ctx']}, {meta['ctx_dim']})")
    if not torch.isfinite(ctx).all():
        raise TrainedScorerError(f"{path}: the context vectors are not all finite")
    return ctx.float(), meta, digest


def load_coop_scorer(path: str, backbone: Any) -> tuple[Coop, dict[str, Any], str]:
    """A CoOp scorer for ``backbone`` (a ``ClipBackbone``) from a checkpoint: the prompt
    embeddings are computed once here. The checkpoint must have been trained on the same
    backbone and weights (``backbone.spec.name`` and ``weights_id``)."""
    from pipeline.model.scorers.saved import TrainedScorerError

    ctx, meta, digest = load_coop(path)
    spec = backbone.spec
    if (meta["backbone"], meta["weights_id"]) != (spec.name, spec.weights_id):
        raise TrainedScorerError(
            f"{path} was trained on {meta['backbone']}@{meta['weights_id']}; this run's CLIP "
            f"is {spec.name}@{spec.weights_id}. Train CoOp on the same backbone and weights.")
    try:
        prompts = CoopPrompts(backbone.model, backbone.tokenizer, int(meta["n_ctx"]),
                              tuple(meta["class_names"]), ctx=ctx)
    except ValueError as exc:
        raise TrainedScorerError(f"{path}: {exc}") from exc
    with torch.no_grad():
        text = prompt_features(backbone.model, prompts)
    scale = float(backbone.model.logit_scale.detach().float())
    return Coop(text, scale), meta, digest


# --------------------------------------------------------------------------------------------
# The entry: CoOp reads the run's CLIP image embedding; its context comes from a checkpoint
# --------------------------------------------------------------------------------------------

COOP = "coop"
TRAIN_HINT = ("train one with: python -m pipeline train --method coop --manifest AUX.parquet "
              "--output DIR (it writes DIR/coop.safetensors) on the run's CLIP model")


class CoopEntry(ScorerEntry):
    """CoOp (Zhou et al., IJCV 2022) as the anomaly baseline: learned prompt context,
    trained once (``train --method coop``); it reads no references, so it scores at any k,
    k = 0 included."""

    name = COOP
    extractor = "clip"
    min_k = 0
    trainable = True
    options = (Option("coop_checkpoint", None,
                      "coop: the trained context vectors (python -m pipeline train --method "
                      "coop)", metavar="FILE"),)

    def checkpoint(self, models: Models) -> str | None:
        return models.setting("coop_checkpoint")

    def check(self, models: Models, k: int) -> None:
        if not self.checkpoint(models):
            raise ValueError(f"coop needs --coop-checkpoint FILE; {TRAIN_HINT}")

    def build(self, models: Models) -> Coop:
        from pipeline.model.backbone import get_backbone

        path, clip = models.setting("coop_checkpoint"), models.clip
        return shared(COOP, (path, clip), lambda: load_coop_scorer(path, get_backbone(clip))[0])

    def identity(self, models: Models, extractor_identity: str, checkpoint_hash: str | None
                 ) -> str:
        return f"{self.name}|{extractor_identity}|checkpoint={checkpoint_hash}"


COOP_ENTRY = CoopEntry()
