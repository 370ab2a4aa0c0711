"""Crash-safe checkpoints of a running EVA computation: a :class:`LoopSnapshot` to files and back.

The loop hands over a snapshot (plain data: counters, config, and per group its statistic and
tracker tensors) and gets one back; this module never reads the loop's fields.

On disk: ``eva_checkpoint-<step>.safetensors`` (tensors) plus ``eva_checkpoint.json`` (everything
else and the tensor file's SHA-256). The tensor file is written under a new name first; renaming the
JSON over the old one is the commit point; older tensor files are deleted only after that. A
``kill -9`` at any moment leaves the previous checkpoint intact, and ``resume`` continues from it to
the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._atomic import atomic_path, atomic_write_text
from .files import StateFileError, read_json_manifest, read_safetensors, sha256_file

FORMAT = "eva-lora-checkpoint"
FORMAT_VERSION = 3  # 3: the windowed sketch statistic and the subspace convergence rule
META = "eva_checkpoint.json"
STAT_PREFIX, TRACKER_PREFIX = "stat", "trk"  # tensor keys: "<prefix>.<group>.<name>"


@dataclass
class GroupSnapshot:
    """One group's part of a snapshot."""

    names: list[str]
    dim: int
    kind: str  # statistic kind: "exact" | "sketch"
    size: int | None  # sketch size
    active: bool
    tokens: int
    total_variance: float
    stat: dict[str, torch.Tensor] = field(repr=False)
    tracker: dict[str, torch.Tensor] = field(repr=False)
    stop_batch: int | None = None


@dataclass
class LoopSnapshot:
    """Everything needed to continue an EVA loop where it stopped."""

    steps: int
    n_batches: int
    config: dict[str, Any]
    single_call: bool
    groups: list[GroupSnapshot]
    ranks: dict[str, int]
    history: list[dict[str, Any]]


def save_snapshot(directory: str | Path, snapshot: LoopSnapshot) -> Path:
    """Write tensors under a fresh name, commit by renaming the JSON, then drop older tensor files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for g, group in enumerate(snapshot.groups):
        for prefix, part in ((STAT_PREFIX, group.stat), (TRACKER_PREFIX, group.tracker)):
            for key, value in part.items():
                tensors[f"{prefix}.{g}.{key}"] = value.detach().cpu().contiguous()
        groups.append({"names": group.names, "dim": group.dim, "kind": group.kind, "size": group.size,
                       "active": group.active, "tokens": group.tokens, "total_variance": group.total_variance,
                       "stop_batch": group.stop_batch})
    name = f"eva_checkpoint-{snapshot.steps}.safetensors"
    with atomic_path(directory / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "tensor_file": name,
              "tensors_sha256": sha256_file(directory / name), "steps": snapshot.steps,
              "n_batches": snapshot.n_batches, "config": snapshot.config, "single_call": snapshot.single_call,
              "groups": groups, "ranks": snapshot.ranks, "history": snapshot.history}
    atomic_write_text(directory / META, json.dumps(record, indent=1, allow_nan=True))
    for old in directory.glob("eva_checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / META


def load_snapshot(directory: str | Path) -> LoopSnapshot | None:
    """The last committed snapshot in ``directory``; None when there is none."""
    directory = Path(directory)
    if not (directory / META).is_file():
        return None
    meta = read_json_manifest(directory / META, FORMAT, FORMAT_VERSION, "an eva-lora checkpoint")
    tensor_path = directory / str(meta.get("tensor_file", ""))
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise StateFileError(f"{tensor_path} is missing or does not match its checksum in {directory / META}")
    tensors = read_safetensors(tensor_path)
    try:
        groups = []
        for g, info in enumerate(meta["groups"]):
            parts = {prefix: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{g}.")}
                     for prefix in (STAT_PREFIX, TRACKER_PREFIX)}
            groups.append(GroupSnapshot([str(n) for n in info["names"]], int(info["dim"]), str(info["kind"]),
                                        None if info["size"] is None else int(info["size"]), bool(info["active"]),
                                        int(info["tokens"]), float(info["total_variance"]),
                                        parts[STAT_PREFIX], parts[TRACKER_PREFIX],
                                        None if info.get("stop_batch") is None else int(info["stop_batch"])))
        return LoopSnapshot(int(meta["steps"]), int(meta["n_batches"]), dict(meta["config"]),
                            bool(meta["single_call"]), groups, {str(k): int(v) for k, v in meta["ranks"].items()},
                            list(meta["history"]))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise StateFileError(f"{directory / META} is not a valid EVA checkpoint: {err}") from err
