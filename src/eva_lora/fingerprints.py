"""What a model and a data set are, in a few lines of JSON, so an artifact can refuse the wrong one.

A state, an adapter or a run folder records the fingerprint of the model (and, for runs, of the
data) it was made from; loading, applying, resuming and evaluating compare it with what they were
given and name what differs (:func:`differences`). A fingerprint is cheap (no pass over the
weights):

- ``architecture``: the model's class and ``config.model_type``;
- ``parameters`` and ``shapes_sha256``: the number of parameters and a hash of every parameter's
  name and shape, so another size of the same family differs;
- ``weights_sha256``: a hash of the first values of a few parameters (the first two and the last
  two), rounded to bfloat16 so that the same checkpoint loaded in float32 or bfloat16 agrees, so
  another checkpoint of the same architecture (a fine-tune, another seed) differs too.

Quantised (4-bit) and sharded parameters hash their local storage: compare like with like.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

VALUES_PER_TENSOR = 1024  # values hashed from each sampled parameter
SAMPLED = 2  # parameters sampled from each end of the parameter list


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """JSON-ready fingerprint of ``model`` (see the module docstring)."""
    config = getattr(model, "config", None)
    params = list(model.named_parameters())
    shapes = hashlib.sha256("\n".join(f"{n}:{list(p.shape)}" for n, p in params).encode())
    weights = hashlib.sha256()
    sampled = params if len(params) <= 2 * SAMPLED else params[:SAMPLED] + params[-SAMPLED:]
    for name, param in sampled:
        weights.update(name.encode())
        weights.update(_leading_values(param))
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for _, p in params),
        "shapes_sha256": shapes.hexdigest(),
        "weights_sha256": weights.hexdigest(),
    }


def _leading_values(param: torch.Tensor) -> bytes:
    local = param.to_local() if hasattr(param, "to_local") else param  # DTensor: this rank's shard
    if local.is_meta or local.numel() == 0:
        return b"meta"
    head = local.detach().reshape(-1)[:VALUES_PER_TENSOR]
    if head.is_floating_point():
        return head.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
    return head.to("cpu").numpy().tobytes()


def data_fingerprint(*paths: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Name, size, hash of the first MiB of each data file (a different or edited file differs)."""
    out = {}
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            continue
        with path.open("rb") as handle:
            head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
        out[path.name] = {"bytes": path.stat().st_size, "head_sha256": head}
    return out


def differences(expected: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> list[str]:
    """``["key: recorded X, now Y", ...]`` for each key whose value differs (nested: dotted key)."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: recorded {_short(a)}, now {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]
