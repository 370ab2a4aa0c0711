"""Crash-safe checkpoints of a running EVA computation (streaming statistics + solver state).

A checkpoint is ``eva_checkpoint-<step>.safetensors`` (accumulators and solver tensors) plus
``eva_checkpoint.json`` (loop state, config, the tensor file's SHA-256). The tensor file is written
under a new name first; renaming the JSON over the old one is the commit point; older tensor
files are deleted only after that. A ``kill -9`` at any moment leaves the previous checkpoint
intact, and ``resume`` continues from it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._atomic import atomic_path, atomic_write_text
from .pca import CovarianceAccumulator
from .state import StateFileError, _sha256

FORMAT = "eva-lora-checkpoint"
FORMAT_VERSION = 1
META = "eva_checkpoint.json"


def save_checkpoint(directory: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write tensors under a fresh name, commit by renaming the JSON, then drop older tensor files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"eva_checkpoint-{meta['steps']}.safetensors"
    with atomic_path(directory / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": FORMAT})
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "tensor_file": name,
              "tensors_sha256": _sha256(directory / name), **meta}
    atomic_write_text(directory / META, json.dumps(record, indent=1, allow_nan=True))
    for old in directory.glob("eva_checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / META


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(meta, tensors) of the last committed checkpoint in ``directory``; None when there is none."""
    directory = Path(directory)
    path = directory / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise StateFileError(f"{path} is not an eva-lora checkpoint of format version {FORMAT_VERSION}")
    tensor_path = directory / str(meta.get("tensor_file", ""))
    if not tensor_path.is_file() or _sha256(tensor_path) != meta.get("tensors_sha256"):
        raise StateFileError(f"{tensor_path} is missing or does not match its checksum in {path}")
    try:
        with safe_open(str(tensor_path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise StateFileError(f"{tensor_path} is not a readable safetensors file: {err}") from err
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise StateFileError(f"{tensor_path}: tensor {key} contains NaN or Inf")
    return meta, tensors


def save_loop(directory: Path, loop: Any) -> None:
    """Checkpoint a running EVA loop: every group's statistics and solver state, and the loop's counters."""
    tensors: dict[str, torch.Tensor] = {}
    trackers = []
    for g, (group, tracker) in enumerate(zip(loop.capture.groups, loop.trackers)):
        for key, value in group.stats.state_dict().items():
            tensors[f"acc.{g}.{key}"] = value
        for key in ("basis", "previous", "values"):
            value = getattr(tracker, key)
            if value is not None:
                tensors[f"trk.{g}.{key}"] = value
        tensors[f"trk.{g}.converged"] = tracker.converged.to(torch.uint8)
        trackers.append({"total_variance": tracker.total_variance, "active": group.active})
    meta = {"steps": loop.steps, "n_batches": loop.n_batches, "config": loop.config.to_dict(),
            "single_call": loop.capture.single_call,
            "groups": [g.names for g in loop.capture.groups], "trackers": trackers, "ranks": loop.ranks,
            "history": loop.history}
    save_checkpoint(directory, meta, tensors)


def restore_loop(loop: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back the groups, statistics and solver state of a checkpoint: the run continues
    exactly as if it had never stopped (no probe pass, bit-identical statistics)."""
    device = loop.device or torch.device("cpu")
    stats = [CovarianceAccumulator.from_state_dict(
        {key: tensors[f"acc.{g}.{key}"] for key in ("count", "shift", "sum", "moment")}, device)
        for g in range(len(meta["groups"]))]
    loop.capture.restore_groups(meta["groups"], stats, bool(meta.get("single_call", False)))
    loop._setup_groups()
    for g, (group, tracker) in enumerate(zip(loop.capture.groups, loop.trackers)):
        group.active = bool(meta["trackers"][g]["active"])
        for key in ("basis", "previous", "values"):
            if f"trk.{g}.{key}" in tensors:
                setattr(tracker, key, tensors[f"trk.{g}.{key}"].to(device))
        tracker.values = None if tracker.values is None else tracker.values.cpu()
        tracker.converged = tensors[f"trk.{g}.converged"].bool()
        tracker.total_variance = float(meta["trackers"][g]["total_variance"])
    loop.ranks = {k: int(v) for k, v in meta["ranks"].items()}
    loop.history = list(meta["history"])
    loop.capture.set_exit_point(loop.config.early_exit)
