"""A disk cache of backbone features, keyed by image content hash and feature identity.

The backbone is frozen, so an image's features depend only on its bytes and on the backbone
(architecture, weights, blocks, precision). One safetensors file per image under a folder
per feature identity: writes are atomic (temp file, then rename), readers open files lazily,
and the cache works on any fsspec filesystem.
"""
from __future__ import annotations

import hashlib
import logging
import uuid

import fsspec
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.model.backbone import BackboneSpec, ImageFeatures

LOG = logging.getLogger(__name__)


def feature_identity(spec: BackboneSpec) -> str:
    """What features depend on: backbone id, blocks and numeric precision."""
    blocks = ",".join(map(str, spec.blocks)) if spec.blocks else "default"
    return f"{spec.backbone_id}|blocks={blocks}|precision={spec.precision}"


class FeatureCache:
    """Per-image features stored as ``<root>/<identity-hash>/<aa>/<sha256>.safetensors``."""

    def __init__(self, root: str, spec: BackboneSpec) -> None:
        self.identity = feature_identity(spec)
        digest = hashlib.sha256(self.identity.encode()).hexdigest()[:16]
        self.root = f"{root.rstrip('/')}/{digest}"
        self._fs, _, (self._local_root,) = fsspec.get_fs_token_paths(self.root)

    def _local(self, content_hash: str) -> str:
        return f"{self._local_root}/{content_hash[:2]}/{content_hash}.safetensors"

    def contains(self, content_hash: str) -> bool:
        return self._fs.exists(self._local(content_hash))

    def get(self, content_hash: str) -> ImageFeatures | None:
        """Features with a batch dimension of 1, or None when absent or unreadable."""
        path = self._local(content_hash)
        try:
            with self._fs.open(path, "rb") as f:
                state = st_load(f.read())
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged entry is a miss, and gets rewritten
            LOG.warning("Ignoring unreadable feature cache entry %s: %s", path, exc)
            return None
        return ImageFeatures(state["tokens"], state["embeds"])

    def put(self, content_hash: str, features: ImageFeatures) -> None:
        """Store one image's features (batch dimension 1) atomically."""
        path = self._local(content_hash)
        folder = path.rpartition("/")[0]
        self._fs.makedirs(folder, exist_ok=True)
        data = st_save(
            {"tokens": features.tokens.detach().cpu().contiguous(),
             "embeds": features.embeds.detach().cpu().contiguous()},
            metadata={"identity": self.identity},
        )
        tmp = f"{folder}/.{content_hash}.{uuid.uuid4().hex}.tmp"
        with self._fs.open(tmp, "wb") as f:
            f.write(data)
        self._fs.mv(tmp, path)
