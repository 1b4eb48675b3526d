"""Trained comparison scorers on disk (RegAD, CoOp): one safetensors file of tensors plus one
JSON metadata document, never a pickle. The metadata names its format (``regad/1``); a file
of another format, a pickle, a truncated or otherwise unreadable file is one
``TrainedScorerError`` that says which file and why."""
from __future__ import annotations

import functools
import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.model.checkpoint import file_hash

_METADATA_KEY = "scorer"


class TrainedScorerError(ValueError):
    """A trained scorer's file is missing, unreadable, of another kind or does not fit."""


def save_trained(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
    """Write ``tensors`` and ``metadata`` (JSON-able, with a ``format``); returns the file's
    content hash (the first 16 hex digits of its sha256, as InCTRL heads' ``heads_hash``)."""
    if "format" not in metadata:
        raise ValueError("trained scorer metadata needs a 'format'")
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = st_save(state, metadata={_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    with fsspec.open(path, "wb") as f:
        f.write(data)
    return file_hash(data)


def load_trained(path: str, fmt: str, what: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, metadata, content hash) of a file written by ``save_trained`` in format
    ``fmt``; ``what`` names the file's kind in errors (``RegAD checkpoint``)."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise TrainedScorerError(f"{what} not found: {path}") from exc
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or not 0 < header_len <= len(data) - 8:
            raise ValueError("no safetensors header")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"][_METADATA_KEY])
        tensors = st_load(data)
    except Exception as exc:  # json, safetensors and KeyError: one message
        # Only once it is not a safetensors file: a header length may start with these bytes.
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise TrainedScorerError(
                f"{path} is a pickle (torch.save) file; a {what} is only read from the "
                "safetensors file the train command writes") from exc
        raise TrainedScorerError(f"{path} is not a valid {what} (a safetensors file with "
                                 f"scorer metadata): {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise TrainedScorerError(f"{path} is not a {what}: its format is {found!r}, not {fmt!r}")
    return tensors, meta, file_hash(data)


def require(meta: dict[str, Any], keys: tuple[str, ...], path: str, what: str) -> None:
    """TrainedScorerError unless ``meta`` has every key."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise TrainedScorerError(f"{path}: the {what}'s metadata lacks {missing}")


@functools.lru_cache(maxsize=16)
def _described(path: str, size: int, mtime: float, fmt: str, what: str
               ) -> tuple[dict[str, Any], str]:
    _, meta, digest = load_trained(path, fmt, what)
    return meta, digest


def describe_trained(path: str, fmt: str, what: str) -> tuple[dict[str, Any], str]:
    """(metadata, content hash) of a trained file, read once per process while the file is
    unchanged (decoding workers and the launcher need its input size, not its model)."""
    try:
        info = fsspec.core.url_to_fs(path)[0].info(path)
    except FileNotFoundError as exc:
        raise TrainedScorerError(f"{what} not found: {path}") from exc
    return _described(path, int(info.get("size") or 0), float(info.get("mtime") or 0), fmt,
                      what)
