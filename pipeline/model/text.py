"""open_clip's CLIP text tower, run on the shortest prefix that holds every end-of-text token.

CLIP pads every prompt to 77 tokens, runs all of them through a causally masked transformer,
then keeps only the output at the end-of-text token (the highest token id, ``argmax``
pooling). Under a causal mask no position sees a later one, so the tokens after the last
end-of-text token of a batch cannot change what is kept: cutting them off gives the same
embeddings, up to float rounding (different matrix shapes sum in a different order). InCTRL's
prompts are short (at most about 20 tokens), so a category's 242-prompt ensemble costs about a
sixth of the full-length pass.

This composes the model's own modules (embedding, transformer, final norm, pooling and
projection) exactly as ``CLIP.encode_text`` does; any model it cannot vouch for (another class,
an overridden ``encode_text``, another pooling, a non-causal mask) goes through
``encode_text`` unchanged.
"""
from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn


def prefix_applies(model: nn.Module) -> bool:
    """Whether ``model``'s text tower is open_clip's causal, argmax-pooled CLIP tower."""
    if not isinstance(model, CLIP) or type(model).encode_text is not CLIP.encode_text:
        return False
    if getattr(model, "text_pool_type", None) != "argmax":
        return False
    mask = getattr(model, "attn_mask", None)
    context = model.positional_embedding.shape[0]
    if mask is None or tuple(mask.shape) != (context, context):
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    return bool(torch.equal(mask, causal))


def encode_text_prefix(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings (not normalised) as ``model.encode_text(tokens)`` gives them.

    tokens: (batch, context_length) token ids from the model's tokenizer
    returns (batch, embed_dim) in the tower's dtype
    """
    if not prefix_applies(model):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1  # last end-of-text position, plus one
    tokens = tokens[:, :length]
    return _tower(model, model.token_embedding(tokens), tokens)


def encode_token_embeddings(model: nn.Module, embeddings: torch.Tensor,
                            tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings (not normalised) of prompts given as token *embeddings*: what
    ``encode_text`` computes after its token lookup, for prompts some of whose token vectors
    are learned (CoOp's context). ``tokens`` only places the end-of-text token (argmax).

    embeddings: (batch, context_length, width); tokens: (batch, context_length)
    returns (batch, embed_dim) in the tower's dtype
    """
    if not prefix_applies(model):
        raise TypeError(f"{type(model).__name__} is not open_clip's causal, argmax-pooled CLIP "
                        "text tower; prompts of learned token vectors need one")
    if embeddings.shape[:2] != tokens.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} do not match tokens "
                         f"{tuple(tokens.shape)}")
    length = int(tokens.argmax(dim=-1).max()) + 1
    return _tower(model, embeddings[:, :length], tokens[:, :length])


def _tower(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text after the token lookup, on the first ``tokens.shape[1]`` positions."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = x.to(cast_dtype)  # (batch, length, width)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, "argmax")  # (batch, width)
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
