"""A disk cache of extractors' features, keyed by image content hash and feature identity.

Every extractor is frozen, so an image's features depend only on its bytes and on the
extractor's identity (``ExtractorEntry.identity``: architecture, weights, layers, input
size, precision). One safetensors file per image under a folder per identity, holding that
extractor's Features by name (CLIP's ``tokens`` and ``embeds``; a CNN's ``s8``, ...): writes
are atomic (temp file, then rename), readers open files lazily, and the cache works on any
fsspec filesystem. The training job and scoring runs share it: InCTRL's identity is the
backbone's ``feature_id`` either way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Mapping, Sequence

import fsspec
import torch
from safetensors.torch import load as st_load, save as st_save

from pipeline.model.backbone import BackboneSpec

LOG = logging.getLogger(__name__)


class FeatureCache:
    """Per-image features stored as ``<root>/<identity-hash>/<aa>/<sha256>.safetensors``.

    ``identity``: the features' identity, or a CLIP BackboneSpec (its ``feature_id``)."""

    def __init__(self, root: str, identity: str | BackboneSpec) -> None:
        self.identity = identity.feature_id if isinstance(identity, BackboneSpec) else identity
        digest = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        self.root = f"{root.rstrip('/')}/{digest}"
        self._fs, _, (self._local_root,) = fsspec.get_fs_token_paths(self.root)

    def _local(self, content_hash: str) -> str:
        return f"{self._local_root}/{content_hash[:2]}/{content_hash}.safetensors"

    def contains(self, content_hash: str) -> bool:
        return self._fs.exists(self._local(content_hash))

    def get(self, content_hash: str) -> dict[str, torch.Tensor] | None:
        """One image's Features (batch dimension 1) by name, or None when absent or
        unreadable."""
        path = self._local(content_hash)
        try:
            with self._fs.open(path, "rb") as f:
                state = st_load(f.read())
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged entry is a miss, and gets rewritten
            LOG.warning("Ignoring unreadable feature cache entry %s: %s", path, exc)
            return None
        return dict(state)

    def put(self, content_hash: str, features: Mapping[str, torch.Tensor]) -> None:
        """Store one image's Features (batch dimension 1) atomically."""
        self._atomic_write(self._local(content_hash), st_save(
            {name: value.detach().cpu().contiguous() for name, value in features.items()},
            metadata={"identity": self.identity},
        ))

    # Prompt-ensemble embeddings live beside the CLIP features: the same backbone identity.
    def _text_local(self, prompts_key: str) -> str:
        return f"{self._local_root}/text/{prompts_key}.safetensors"

    def get_text(self, prompts_key: str) -> torch.Tensor | None:
        """Cached (2, embed_dim) text features for a prompt set, or None."""
        try:
            with self._fs.open(self._text_local(prompts_key), "rb") as f:
                return st_load(f.read())["text"]
        except FileNotFoundError:
            return None
        except Exception as exc:
            LOG.warning("Ignoring unreadable prompt cache entry %s: %s", prompts_key, exc)
            return None

    def put_text(self, prompts_key: str, text: torch.Tensor) -> None:
        self._atomic_write(self._text_local(prompts_key),
                           st_save({"text": text.detach().cpu().contiguous()},
                                   metadata={"identity": self.identity}))

    def _atomic_write(self, path: str, data: bytes) -> None:
        folder, _, name = path.rpartition("/")
        self._fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        with self._fs.open(tmp, "wb") as f:
            f.write(data)
        self._fs.mv(tmp, path)


class MissingFeatures(KeyError):
    """An image's features are not in the cache (never stored, removed, or unreadable)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing features"


def read_stacked(cache: FeatureCache, content_hashes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Several images' Features stacked along the batch in the given order (each entry has
    batch dimension 1: the result's is ``len(content_hashes)``); MissingFeatures names the
    first image not in the cache. No hashes: an empty dict."""
    entries = []
    for content_hash in content_hashes:
        feats = cache.get(content_hash)
        if feats is None:
            raise MissingFeatures(f"the features of image {content_hash[:16]}… are not in the "
                                  f"feature cache {cache.root}")
        entries.append(feats)
    if not entries:
        return {}
    return {name: torch.cat([e[name] for e in entries]) for name in entries[0]}


def prompts_key(normal: list[str], anomalous: list[str]) -> str:
    """Content key of a prompt set: the features depend on the exact texts only."""
    text = "\n".join(normal) + "\x1e" + "\n".join(anomalous)
    return hashlib.sha256(text.encode()).hexdigest()


class SelectionCache:
    """Chosen references of a pool, kept beside the features: ``<root>/selections/<aa>/<key>.json``
    with ``{extractor: [image ids]}``. The key (``selection_key``) covers the pool's images,
    k, the method and the extractors' identities, so a changed pool is chosen afresh."""

    def __init__(self, root: str) -> None:
        self.root = f"{root.rstrip('/')}/selections"
        self._fs, _, (self._local_root,) = fsspec.get_fs_token_paths(self.root)

    def _local(self, key: str) -> str:
        return f"{self._local_root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict[str, list[str]] | None:
        try:
            with self._fs.open(self._local(key), "rb") as f:
                return json.loads(f.read())["chosen"]
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged entry is a miss, and gets rewritten
            LOG.warning("Ignoring unreadable reference selection %s: %s", key, exc)
            return None

    def put(self, key: str, chosen: dict[str, list[str]]) -> None:
        path = self._local(key)
        folder, _, name = path.rpartition("/")
        self._fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        with self._fs.open(tmp, "wb") as f:
            f.write(json.dumps({"chosen": chosen}).encode())
        self._fs.mv(tmp, path)


def selection_key(method: str, k: int, identities: dict[str, str],
                  pool: list[tuple[str, str]]) -> str:
    """Content key of one choice: method, k, each extractor's identity and the pool's
    (image_id, image_uri) pairs in any order."""
    text = json.dumps([method, k, sorted(identities.items()), sorted(pool)])
    return hashlib.sha256(text.encode()).hexdigest()
