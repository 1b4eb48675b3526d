"""Saving and loading InCTRL heads: safetensors with JSON metadata, never pickles.

Also imports the official InCTRL checkpoint format (a torch file holding ``model_state``),
read with ``torch.load(weights_only=True)`` so no arbitrary code can run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import asdict, dataclass, field

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.model.backbone import Geometry
from pipeline.model.heads import InCTRLHeads

LOG = logging.getLogger(__name__)

FORMAT = "inctrl-heads/1"
_METADATA_KEY = "inctrl"


class CheckpointError(ValueError):
    """A heads file is unreadable, unsafe or does not fit the backbone."""


@dataclass(frozen=True)
class HeadsMetadata:
    """What the heads were trained with; stored beside the weights."""

    backbone: str
    pretrained: str
    blocks: tuple[int, ...]
    image_size: tuple[int, int]
    embed_dim: int
    num_patches: int
    k: int
    train_manifest_hash: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HeadsMetadata":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise CheckpointError("heads metadata is not in the inctrl-heads/1 format")
        d["blocks"] = tuple(d["blocks"])
        d["image_size"] = tuple(d["image_size"])
        return cls(**d)


def _read(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"heads checkpoint not found: {path}") from exc


def file_hash(data: bytes) -> str:
    """Short content hash that identifies a heads checkpoint in model ids."""
    return hashlib.sha256(data).hexdigest()[:16]


def _looks_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON header that fits in the file.
    header_len = int.from_bytes(data[:8], "little")
    return len(data) > 8 and 8 + header_len <= len(data) and data[8:9] == b"{"


def _looks_pickled(data: bytes) -> bool:
    # Protocol-2+ pickles start with 0x80; torch.save files are zip archives holding a pickle.
    # A safetensors header length can start with the same bytes (e.g. 0x0c80), so rule that out.
    return not _looks_safetensors(data) and (data[:1] == b"\x80" or data[:2] == b"PK")


def save_heads(heads: InCTRLHeads, path: str, metadata: HeadsMetadata) -> str:
    """Write heads as safetensors with metadata; returns the file's content hash."""
    if (metadata.embed_dim, metadata.num_patches) != (heads.embed_dim, heads.num_patches):
        raise CheckpointError("metadata geometry does not match the heads being saved")
    state = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    data = st_save(state, metadata={_METADATA_KEY: metadata.to_json()})
    with fsspec.open(path, "wb") as f:
        f.write(data)
    return file_hash(data)


def load_heads(path: str) -> tuple[InCTRLHeads, HeadsMetadata, str]:
    """Read heads saved by ``save_heads``: (heads in eval mode, metadata, content hash).

    Pickled files (``torch.save`` output) are refused: unpickling can run arbitrary code.
    """
    data = _read(path)
    if _looks_pickled(data):
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file; heads are only loaded from safetensors. "
            "For an official InCTRL checkpoint use 'python -m pipeline import-checkpoint'."
        )
    try:
        state = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = HeadsMetadata.from_json(header["__metadata__"][_METADATA_KEY])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid InCTRL heads safetensors file: {exc}") from exc
    heads = InCTRLHeads(meta.embed_dim, meta.num_patches)
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the heads layout: {exc}") from exc
    return heads.eval(), meta, file_hash(data)


# Official InCTRL key → our key. Their TransformerBasicHead owns an unused BatchNorm over the
# input ('bn1'); its 'bn2'/'bn3' follow the first and second hidden layers.
_HEAD_MAP = {
    "projection1": "fc1",
    "projection2": "fc2",
    "projection3": "fc3",
    "bn2": "bn1",
    "bn3": "bn2",
}
_ADAPTER_MAP = {"fc.0.weight": "down.weight", "fc.2.weight": "up.weight"}
_MODULE_MAP = {"diff_head": "holistic_head", "diff_head_ref": "image_head"}


def _map_official_key(key: str) -> str | None:
    if key.startswith("module."):
        key = key[len("module."):]
    module, _, rest = key.partition(".")
    if module == "adapter":
        return "adapter." + _ADAPTER_MAP[rest] if rest in _ADAPTER_MAP else None
    if module in _MODULE_MAP:
        layer, _, param = rest.partition(".")
        if layer in _HEAD_MAP:
            return f"{_MODULE_MAP[module]}.{_HEAD_MAP[layer]}.{param}"
    return None  # CLIP towers and the unused input BatchNorm


def import_official_checkpoint(path: str) -> InCTRLHeads:
    """Map an official InCTRL checkpoint's adapter and heads onto ``InCTRLHeads``.

    The file is a torch archive of a dict with ``model_state``; it is read with
    ``weights_only=True``. Geometry (embed_dim, patches) is read from the weights.
    """
    data = _read(path)
    if not zipfile.is_zipfile(io.BytesIO(data)) and data[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a torch checkpoint file")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read safely (weights_only=True): {exc}") from exc
    state = obj.get("model_state", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no 'model_state' dict")
    mapped = {}
    for key, value in state.items():
        ours = _map_official_key(key)
        if ours is not None:
            mapped[ours] = value
    try:
        embed_dim = mapped["adapter.down.weight"].shape[1]
        num_patches = mapped["holistic_head.fc1.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"{path} lacks InCTRL's adapter or heads ({exc.args[0]})") from exc
    heads = InCTRLHeads(embed_dim, num_patches)
    try:
        missing, unexpected = heads.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise CheckpointError(f"{path}: official adapter and heads disagree in shape: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: official checkpoint does not map cleanly (missing {missing}, "
            f"unexpected {unexpected})"
        )
    LOG.info("Imported official InCTRL heads from %s (embed_dim=%d, patches=%d)",
             path, embed_dim, num_patches)
    return heads.eval()


def convert_official_checkpoint(source: str, output: str, *, backbone: str, pretrained: str,
                                geometry: Geometry, k: int) -> str:
    """Write an official InCTRL checkpoint's adapter and heads as safetensors heads for
    ``backbone``/``pretrained`` (whose geometry they must fit); returns the heads hash."""
    heads = import_official_checkpoint(source)
    if (heads.embed_dim, heads.num_patches) != (geometry.embed_dim, geometry.num_patches):
        raise CheckpointError(
            f"{source} holds heads for embed_dim={heads.embed_dim}, "
            f"patches={heads.num_patches}; {backbone} has embed_dim={geometry.embed_dim}, "
            f"patches={geometry.num_patches}")
    meta = HeadsMetadata(
        backbone=backbone, pretrained=pretrained, blocks=geometry.blocks,
        image_size=geometry.image_size, embed_dim=heads.embed_dim,
        num_patches=heads.num_patches, k=k, extra={"imported_from": source},
    )
    return save_heads(heads, output, meta)
