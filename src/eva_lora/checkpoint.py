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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import StateFileError, read_pair, write_pair

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


def has_snapshot(directory: str | Path) -> bool:
    """Whether ``directory`` holds a committed checkpoint (its manifest)."""
    return (Path(directory) / META).is_file()


def checkpoint_bytes(widths: list[int], config: Any) -> int:
    """Upper bound of a checkpoint's size: every group's statistic (one group per layer) plus the
    tracker snapshots, as planned without a memory budget."""
    import dataclasses

    from .planning import plan_statistics

    unbounded = dataclasses.replace(config, statistics_budget_mb=None)
    snapshots = sum(2 * config.max_components * w * 4 for w in widths)
    return sum(p.nbytes for p in plan_statistics(widths, unbounded)) + snapshots


def save_snapshot(directory: str | Path, snapshot: LoopSnapshot) -> Path:
    """Write tensors under a fresh name, commit by renaming the JSON, then drop old tensor files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for g, group in enumerate(snapshot.groups):
        for prefix, part in ((STAT_PREFIX, group.stat), (TRACKER_PREFIX, group.tracker)):
            for key, value in part.items():
                tensors[f"{prefix}.{g}.{key}"] = value.detach().cpu().contiguous()
        groups.append(
            {
                "names": group.names,
                "dim": group.dim,
                "kind": group.kind,
                "size": group.size,
                "active": group.active,
                "tokens": group.tokens,
                "total_variance": group.total_variance,
                "stop_batch": group.stop_batch,
            }
        )
    name = f"eva_checkpoint-{snapshot.steps}.safetensors"
    write_pair(
        directory / name,
        tensors,
        directory / META,
        {
            "steps": snapshot.steps,
            "n_batches": snapshot.n_batches,
            "config": snapshot.config,
            "single_call": snapshot.single_call,
            "groups": groups,
            "ranks": snapshot.ranks,
            "history": snapshot.history,
        },
        format_name=FORMAT,
        version=FORMAT_VERSION,
    )
    for old in directory.glob("eva_checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / META


def load_snapshot(directory: str | Path) -> LoopSnapshot | None:
    """The last committed snapshot in ``directory``; None when there is none."""
    directory = Path(directory)
    if not (directory / META).is_file():
        return None
    meta, tensors = read_pair(
        directory / META, format_name=FORMAT, version=FORMAT_VERSION, what="an eva-lora checkpoint"
    )
    try:
        groups = []
        for g, info in enumerate(meta["groups"]):
            parts = {
                prefix: {
                    k.split(".", 2)[2]: v
                    for k, v in tensors.items()
                    if k.startswith(f"{prefix}.{g}.")
                }
                for prefix in (STAT_PREFIX, TRACKER_PREFIX)
            }
            stop = info.get("stop_batch")
            groups.append(
                GroupSnapshot(
                    names=[str(n) for n in info["names"]],
                    dim=int(info["dim"]),
                    kind=str(info["kind"]),
                    size=None if info["size"] is None else int(info["size"]),
                    active=bool(info["active"]),
                    tokens=int(info["tokens"]),
                    total_variance=float(info["total_variance"]),
                    stat=parts[STAT_PREFIX],
                    tracker=parts[TRACKER_PREFIX],
                    stop_batch=None if stop is None else int(stop),
                )
            )
        return LoopSnapshot(
            int(meta["steps"]),
            int(meta["n_batches"]),
            dict(meta["config"]),
            bool(meta["single_call"]),
            groups,
            {str(k): int(v) for k, v in meta["ranks"].items()},
            list(meta["history"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise StateFileError(f"{directory / META} is not a valid EVA checkpoint: {err}") from err
