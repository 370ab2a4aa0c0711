"""EVA across processes with ``torch.distributed``: each group's statistic lives on one owner rank.

Every group has one *owner* rank, chosen by bin packing on the statistic's bytes, that holds its
running statistic and solves it; no other rank keeps any state for it. So the statistic memory of a
rank falls as ``1 / N``, and so does the solve work.

Input modes (``EvaConfig.distributed_inputs``):
- ``sharded``: each rank feeds different batches (a DistributedSampler, ``accelerate``'s prepared
  loader, FSDP). Inside the forward hook of a group, every rank sends its selected rows to the
  owner (one ``gather``), which absorbs them in rank order. Rank ``r`` feeding batches
  ``r, r + N, ...`` therefore gives the owner exactly the sequence one process would see, and the
  result equals one process fed the union of the batches with ``check_every = N``.
- ``replicated``: every rank feeds the same batches. Only the owner absorbs a group's rows (the data
  would otherwise count N times); nothing travels during the forward pass.
- ``auto`` (default): compares a checksum of the first batch across ranks: identical -> replicated,
  different -> sharded.

At a check, owners solve their groups and one small all-reduce shares the eigenvalues, convergence
flags, total variance and token count of every group, so every rank takes the same decisions
(allocation, stop, early exit) and the ranks leave the loop together. At the end each owner
broadcasts its components.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import torch


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank most likely crashed or left the loop."""


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # gloo / nccl raise RuntimeError or DistBackendError subclasses
        rank, size = world()
        raise CollectiveError(
            f"EVA rank {rank}/{size}: the {name} collective failed ({err}); another rank "
            "probably crashed or stopped early: see its log"
        ) from err


def assign_owners(nbytes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each group: largest first onto the least-loaded rank (ties: the lower rank).

    Deterministic from the byte sizes alone, so every rank computes the same assignment.
    """
    owners = [0] * len(nbytes)
    load = [0] * world_size
    for index in sorted(range(len(nbytes)), key=lambda i: (-nbytes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += nbytes[index]
    return owners


def batch_checksum(batch: Any) -> torch.Tensor:
    """A float64 fingerprint of a batch's tensors (sum of values weighted by position)."""
    total = torch.zeros(2, dtype=torch.float64)
    tensors = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (list, tuple))
        else [batch]
    )
    for value in tensors:
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1).to("cpu", torch.float64)
            total[0] += flat.sum()
            total[1] += (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()
    return total


class Communicator:
    """The collectives EVA's loop needs; every method is a no-op for a single process."""

    def __init__(self, mode: str, device: torch.device | None) -> None:
        self.rank, self.size = world()
        self.mode = mode if self.size > 1 else "single"
        device = device if device is not None else torch.device("cpu")
        backend = torch.distributed.get_backend() if self.size > 1 else None
        if backend == "nccl" and device.type != "cuda":
            raise ValueError("the NCCL backend needs the model on a CUDA device")
        self.device = device if backend == "nccl" else torch.device("cpu")  # gloo: CPU tensors
        self.bytes_sent = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def sums_statistics(self) -> bool:
        """True when every rank feeds its own rows into each group (sharded inputs)."""
        return self.active and self.mode == "sharded"

    def _all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        op = op if op is not None else torch.distributed.ReduceOp.SUM
        moved = tensor.to(self.device)
        _collective("all_reduce", torch.distributed.all_reduce, moved, op=op)
        self.bytes_sent += moved.numel() * moved.element_size()
        return moved.to(tensor.device)

    def all_have_batch(self, has_batch: bool) -> bool:
        """True when every rank still has a batch (a rank that ran out ends the loop for all)."""
        if not self.active:
            return has_batch
        flag = torch.tensor([1.0 if has_batch else 0.0], dtype=torch.float64)
        return bool(self._all_reduce(flag, torch.distributed.ReduceOp.MIN).item() == 1.0)

    def resolve_mode(self, batch: Any) -> str:
        """Decide ``auto`` from the first batch: identical on every rank -> replicated."""
        if not self.active or self.mode != "auto":
            return self.mode
        mine = batch_checksum(batch)
        spread = self._all_reduce(mine.clone(), torch.distributed.ReduceOp.MAX) - self._all_reduce(
            mine.clone(), torch.distributed.ReduceOp.MIN
        )
        self.mode = (
            "replicated" if bool((spread.abs() <= 1e-9 * (1 + mine.abs())).all()) else "sharded"
        )
        return self.mode

    def check_same_groups(self, groups: list[list[str]]) -> None:
        """Every rank must have found the same groups (same model, same targets)."""
        if not self.active:
            return
        mine = [groups]
        everyone: list[Any] = [None] * self.size
        _collective("all_gather_object", torch.distributed.all_gather_object, everyone, mine)
        for rank, theirs in enumerate(everyone):
            if theirs != mine:
                raise ValueError(
                    f"EVA rank {rank} found other layer groups than rank {self.rank}: every rank "
                    "must run the same model with the same target_modules"
                )

    def gather_rows(self, rows: torch.Tensor, owner: int) -> list[torch.Tensor] | None:
        """Every rank's rows, in rank order, on ``owner`` (None elsewhere); two collectives.

        Sizes first, then rows."""
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(count) for _ in range(self.size)]
        _collective("all_gather", torch.distributed.all_gather, sizes, count)
        sizes_list = [int(s.item()) for s in sizes]
        padded = rows.new_zeros(max(sizes_list), rows.shape[1], device=self.device)
        padded[: rows.shape[0]] = rows
        if self.rank == owner:
            received = [torch.empty_like(padded) for _ in range(self.size)]
            _collective("gather", torch.distributed.gather, padded, gather_list=received, dst=owner)
            return [part[:n].to(rows.device) for part, n in zip(received, sizes_list)]
        _collective("gather", torch.distributed.gather, padded, dst=owner)
        self.bytes_sent += padded.numel() * padded.element_size()
        return None

    def share_solutions(self, packed: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank packed results where each rank filled only the rows of its own groups."""
        return self._all_reduce(packed) if self.active else packed

    def broadcast_from(self, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        if not self.active:
            return tensor
        moved = tensor.to(self.device).contiguous()
        _collective("broadcast", torch.distributed.broadcast, moved, src=owner)
        if self.rank == owner:
            self.bytes_sent += moved.numel() * moved.element_size()
        return moved.to(tensor.device)


def default_timeout() -> datetime.timedelta:
    """What we recommend for init_process_group's timeout.

    Long enough for a slow forward, short enough to end a hang."""
    return datetime.timedelta(minutes=10)
