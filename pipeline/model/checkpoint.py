"""Saving and loading InCTRL heads: safetensors with JSON metadata, never pickles.

Also imports the official InCTRL checkpoint format (a torch file holding ``model_state``),
read with ``torch.load(weights_only=True)`` so no arbitrary code can run. Its CLIP towers are
kept: written beside the heads as an open_clip weights file the heads' metadata names.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import zipfile
from dataclasses import asdict, dataclass, field

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.model.backbone import Geometry, state_layout
from pipeline.model.heads import InCTRLHeads

LOG = logging.getLogger(__name__)

FORMAT = "inctrl-heads/1"
_METADATA_KEY = "inctrl"
TOWERS_FORMAT = "open_clip-state-dict"
TOWERS_SUFFIX = ".towers.safetensors"


class CheckpointError(ValueError):
    """A heads file is unreadable, unsafe or does not fit the backbone."""


@dataclass(frozen=True)
class HeadsMetadata:
    """What the heads were trained with; stored beside the weights.

    ``towers`` names CLIP weights that belong to the heads (an imported official model's
    frozen towers): a file beside the heads, by its path relative to the heads' folder, with
    its full sha256 in ``towers_sha256``. Empty when the heads run on ``pretrained``.
    """

    backbone: str
    pretrained: str
    blocks: tuple[int, ...]
    image_size: tuple[int, int]
    embed_dim: int
    num_patches: int
    k: int
    train_manifest_hash: str = ""
    extra: dict = field(default_factory=dict)
    towers: str = ""
    towers_sha256: str = ""

    def __post_init__(self) -> None:
        if bool(self.towers) != bool(self.towers_sha256):
            raise CheckpointError("heads metadata names towers without their sha256, or the "
                                  "other way round")
        if self.towers and (posixpath.isabs(self.towers) or "://" in self.towers
                            or ".." in self.towers.split("/")):
            raise CheckpointError(f"heads metadata towers {self.towers!r} is not a path "
                                  "relative to the heads' folder")

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


def towers_location(checkpoint: str, meta: HeadsMetadata) -> str:
    """Where the towers named in ``meta`` lie: beside the heads file ``checkpoint``."""
    if not meta.towers:
        raise CheckpointError(f"{checkpoint} names no towers of its own")
    if "://" in checkpoint:
        return posixpath.join(posixpath.dirname(checkpoint), meta.towers)
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), *meta.towers.split("/"))


def _towers_name(output: str) -> str:
    """``heads.safetensors`` → ``heads.towers.safetensors`` (open_clip reads safetensors by
    the file's suffix)."""
    name = posixpath.basename(output.replace(os.sep, "/"))
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    return stem + TOWERS_SUFFIX


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


_MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header


def _metadata_of(header_bytes: bytes) -> HeadsMetadata:
    header = json.loads(header_bytes)
    return HeadsMetadata.from_json(header["__metadata__"][_METADATA_KEY])


def read_heads_metadata(path: str) -> HeadsMetadata:
    """The metadata of a heads file saved by ``save_heads``, without reading its weights."""
    try:
        with fsspec.open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little")
            if len(head) < 8 or not 0 < header_len < _MAX_HEADER:
                raise ValueError("no safetensors header")
            header = f.read(header_len)
        if header[:1] != b"{" or len(header) < header_len:
            raise ValueError("no safetensors header")
        return _metadata_of(header)
    except FileNotFoundError as exc:
        raise CheckpointError(f"heads checkpoint not found: {path}") from exc
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a valid InCTRL heads safetensors file: {exc}") from exc


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
        meta = _metadata_of(data[8:8 + header_len])
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


def _official_state(path: str) -> dict:
    """The ``model_state`` of an official checkpoint, read with ``weights_only=True``, with
    any ``module.`` (DistributedDataParallel) prefix removed."""
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
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _official_heads(state: dict, path: str) -> InCTRLHeads:
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


def import_official_checkpoint(path: str) -> InCTRLHeads:
    """Map an official InCTRL checkpoint's adapter and heads onto ``InCTRLHeads``.

    The file is a torch archive of a dict with ``model_state``; it is read with
    ``weights_only=True``. Geometry (embed_dim, patches) is read from the weights.
    """
    return _official_heads(_official_state(path), path)


def _is_heads_key(key: str) -> bool:
    return key.partition(".")[0] in ("adapter", *_MODULE_MAP)


def official_towers(state: dict, backbone: str, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The CLIP towers of an official checkpoint's (prefix-free) ``state``: exactly the keys of
    open_clip model ``backbone``, each of its shape, so open_clip loads them strictly."""
    layout = state_layout(backbone)
    missing = [k for k in layout if k not in state]
    if missing:
        raise CheckpointError(
            f"{path} lacks the CLIP towers of {backbone} ({len(missing)} of {len(layout)} "
            f"weights missing, e.g. {missing[:3]}); it cannot run as the official model")
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in layout.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"{path}: its CLIP towers are not those of {backbone} "
                              f"({len(wrong)} shapes differ, e.g. {wrong[:3]})")
    unused = [k for k in state if k not in layout and not _is_heads_key(k)]
    if unused:
        LOG.warning("%s: %d weights are neither %s towers nor InCTRL heads and are not kept: %s",
                    path, len(unused), backbone, unused[:5])
    return {k: state[k].detach().to("cpu").contiguous().clone() for k in layout}


def _write(path: str, data: bytes) -> None:
    with fsspec.open(path, "wb") as f:
        f.write(data)


def convert_official_checkpoint(source: str, output: str, *, backbone: str, geometry: Geometry,
                                k: int) -> str:
    """Write an official InCTRL checkpoint as heads for ``backbone`` (whose geometry they must
    fit) plus its CLIP towers beside them; returns the heads hash.

    The towers go to ``<output stem>.towers.safetensors``, an open_clip weights file; the
    heads' metadata names it and its sha256, so scoring with the heads alone runs exactly the
    official model."""
    state = _official_state(source)
    heads = _official_heads(state, source)
    if (heads.embed_dim, heads.num_patches) != (geometry.embed_dim, geometry.num_patches):
        raise CheckpointError(
            f"{source} holds heads for embed_dim={heads.embed_dim}, "
            f"patches={heads.num_patches}; {backbone} has embed_dim={geometry.embed_dim}, "
            f"patches={geometry.num_patches}")
    towers = official_towers(state, backbone, source)
    del state
    towers_name = _towers_name(output)
    towers_data = st_save(towers, metadata={
        "format": TOWERS_FORMAT, "backbone": backbone,
        "imported_from": posixpath.basename(source.replace(os.sep, "/"))})
    del towers
    towers_sha256 = hashlib.sha256(towers_data).hexdigest()
    meta = HeadsMetadata(
        backbone=backbone, pretrained=towers_name, blocks=geometry.blocks,
        image_size=geometry.image_size, embed_dim=heads.embed_dim,
        num_patches=heads.num_patches, k=k, extra={"imported_from": source},
        towers=towers_name, towers_sha256=towers_sha256,
    )
    # Towers first: heads never name a file that is not there.
    towers_path = towers_location(output, meta)
    _write(towers_path, towers_data)
    LOG.info("Wrote the official CLIP towers to %s (sha256 %s)", towers_path, towers_sha256)
    return save_heads(heads, output, meta)
