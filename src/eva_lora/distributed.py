"""EVA across processes with ``torch.distributed``: statistics are all-reduced, solves are shared out.

What travels is the streaming statistic, never activations: per active group and check, the
increment of (count, sum, second moment) since the previous check, one all-reduce of ``d^2 + d + 1``
numbers (PEFT's EVA all-gathers every layer's activations at every step). Each group is solved by
one owner rank (``group_index % world_size``) and the results are shared with one small all-reduce,
so the solve work per rank falls as ranks are added. Every decision (convergence, stop, ranks) is
computed from identical reduced numbers on every rank, so all ranks leave the loop together.

Input modes (``EvaConfig.distributed_inputs``):
- ``sharded``: each rank feeds different batches (a DistributedSampler, ``accelerate``'s prepared
  loader). Statistics are summed; the result equals one process fed the union of the batches.
- ``replicated``: every rank feeds the same batches. Nothing is summed (the data would count N
  times); only the solves are shared out.
- ``auto`` (default): compares a checksum of the first batch across ranks: identical -> replicated,
  different -> sharded.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import torch

from .pca import CovarianceAccumulator


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank most likely crashed or left the loop."""


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when torch.distributed is not in use."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # gloo / nccl raise RuntimeError or DistBackendError subclasses
        rank, size = world()
        raise CollectiveError(f"EVA rank {rank}/{size}: the {name} collective failed ({err}); another rank "
                              "probably crashed or stopped early: see its log") from err


def batch_checksum(batch: Any) -> torch.Tensor:
    """A float64 fingerprint of a batch's tensors (sum of values weighted by position)."""
    total = torch.zeros(2, dtype=torch.float64)
    tensors = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
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
        self.mode = mode
        self.device = device if device is not None else torch.device("cpu")
        if self.size > 1 and torch.distributed.get_backend() == "nccl" and self.device.type != "cuda":
            raise ValueError("the NCCL backend needs the model on a CUDA device")
        self.bytes_reduced = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def sums_statistics(self) -> bool:
        return self.active and self.mode == "sharded"

    def owns(self, group_index: int) -> bool:
        return group_index % self.size == self.rank

    def _reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        op = op if op is not None else torch.distributed.ReduceOp.SUM
        moved = tensor.to(self.device)
        _collective("all_reduce", torch.distributed.all_reduce, moved, op=op)
        self.bytes_reduced += moved.numel() * moved.element_size()
        return moved.to(tensor.device)

    def all_have_batch(self, has_batch: bool) -> bool:
        """True when every rank still has a batch (a rank that ran out ends the loop for all)."""
        if not self.active:
            return has_batch
        flag = torch.tensor([1.0 if has_batch else 0.0], dtype=torch.float64)
        return bool(self._reduce(flag, torch.distributed.ReduceOp.MIN).item() == 1.0)

    def resolve_mode(self, batch: Any) -> str:
        """Decide ``auto`` from the first batch: identical on every rank -> replicated."""
        if not self.active or self.mode != "auto":
            return self.mode
        mine = batch_checksum(batch)
        spread = self._reduce(mine.clone(), torch.distributed.ReduceOp.MAX) - self._reduce(
            mine.clone(), torch.distributed.ReduceOp.MIN)
        self.mode = "replicated" if bool((spread.abs() <= 1e-9 * (1 + mine.abs())).all()) else "sharded"
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
                raise ValueError(f"EVA rank {rank} found other layer groups than rank {self.rank}: every rank "
                                 "must run the same model with the same target_modules")

    def share_shift(self, stats: CovarianceAccumulator) -> None:
        """Give every rank rank 0's shift so that statistics can be summed (sharded mode)."""
        if not self.sums_statistics:
            return
        shift = stats.shift.clone().to(self.device)
        _collective("broadcast", torch.distributed.broadcast, shift, src=0)
        stats.recenter(shift)

    def reduce_into(self, local: CovarianceAccumulator, total: CovarianceAccumulator) -> None:
        """total += sum over ranks of ``local``; then ``local`` restarts from zero (same shift)."""
        head = self._reduce(torch.cat([torch.tensor([float(local.count)], dtype=torch.float64,
                                                    device=local.device), local.sum]))
        total.count += int(round(head[0].item()))
        total.sum += head[1:].to(total.sum)
        total.moment += self._reduce(local.moment)  # its own dtype: float32 by default, half the bytes
        local.reset()

    def share_solutions(self, packed: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank packed results where each rank filled only the rows of the groups it owns."""
        return self._reduce(packed) if self.active else packed

    def broadcast_from_owner(self, tensor: torch.Tensor, group_index: int) -> torch.Tensor:
        if not self.active:
            return tensor
        moved = tensor.to(self.device).contiguous()
        _collective("broadcast", torch.distributed.broadcast, moved, src=group_index % self.size)
        self.bytes_reduced += moved.numel() * moved.element_size()
        return moved.to(tensor.device)


def default_timeout() -> datetime.timedelta:
    """What we recommend for init_process_group: long enough for a slow forward, short enough to end a hang."""
    return datetime.timedelta(minutes=10)
