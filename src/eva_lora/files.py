"""Reading the files eva-lora writes (JSON manifest + safetensors), refusing anything damaged.

Shared by the state (:mod:`eva_lora.state`) and checkpoint (:mod:`eva_lora.checkpoint`) formats:
both are a JSON manifest naming its format, format version and the SHA-256 of a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


class StateFileError(ValueError):
    """A state or checkpoint file that is missing, truncated, foreign or inconsistent."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_manifest(path: Path, format_name: str, version: int, what: str) -> dict[str, Any]:
    """The JSON object at ``path`` if its ``format`` and ``format_version`` are the expected ones."""
    if not path.is_file():
        raise StateFileError(f"{path} not found: not {what}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{path} is not valid JSON (truncated?): {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise StateFileError(f"{path} is not {what} (format field is {found!r})")
    if meta.get("format_version") != version:
        raise StateFileError(f"{path}: unsupported format_version {meta.get('format_version')!r} "
                             f"(this eva-lora reads {version})")
    return meta


def read_safetensors(path: Path, finite: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; with ``finite``, float tensors must hold no NaN or Inf."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise StateFileError(f"{path} is not a readable safetensors file: {err}") from err
    for key, tensor in tensors.items():
        if finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise StateFileError(f"{path}: tensor {key} contains NaN or Inf")
    return tensors
