"""Which statistic each group gets, on which rank, within which memory budget. Pure functions.

``auto`` keeps the exact statistic where it is small (``dim <= exact_max_dim``: at most 4 MB per
group at the default 1024, and no more flops per row than the sketch's ``4 * size * dim`` for
``dim <= 4 * size``) and a bounded sketch everywhere else: at Llama-3-8B widths (4096 / 14336)
every group is a sketch. A memory budget per process turns exact groups into sketches, largest
first, until every rank fits; when even sketches do not fit, the error says by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .distributed import assign_owners
from .statistics import exact_bytes, sketch_bytes, sketch_update_bytes

MB = 2**20


@dataclass(frozen=True)
class GroupPlan:
    """The statistic of one group: its kind, its sketch size (None for exact), owner and bytes."""

    kind: str
    size: int | None
    owner: int
    nbytes: int  # held between batches


def statistic_bytes(kind: str, dim: int, size: int, element_size: int = 4) -> int:
    """Bytes a group's statistic holds between batches."""
    return (
        exact_bytes(dim, element_size) if kind == "exact" else sketch_bytes(dim, size, element_size)
    )


def update_bytes(kind: str, dim: int, size: int, element_size: int = 4) -> int:
    """Extra bytes while one group's statistic absorbs rows (the exact update works in place)."""
    return 0 if kind == "exact" else sketch_update_bytes(dim, size, None, element_size)


def rank_loads(
    plans: Sequence[GroupPlan],
    dims: Sequence[int],
    size: int,
    world_size: int,
    element_size: int = 4,
) -> list[int]:
    """Peak statistic bytes of each rank: what its groups hold plus the largest single update."""
    loads = []
    for rank in range(world_size):
        mine = [(p, d) for p, d in zip(plans, dims) if p.owner == rank]
        held = sum(p.nbytes for p, _ in mine)
        loads.append(
            held + max((update_bytes(p.kind, d, size, element_size) for p, d in mine), default=0)
        )
    return loads


def plan_statistics(
    dims: Sequence[int], config: Any, world_size: int = 1, names: Sequence[str] | None = None
) -> list[GroupPlan]:
    """Kind, sketch size and owner of each group of input width ``dims[i]``.

    ``config``: an :class:`~eva_lora.EvaConfig` (``statistics``, ``sketch_size``, ``exact_max_dim``,
    ``statistics_budget_mb``, ``stats_dtype``). Raises ``ValueError`` when the budget cannot hold
    even the sketches of the groups one rank owns.
    """
    element = 8 if config.stats_dtype == "float64" else 4
    size = config.resolved_sketch_size
    if config.statistics == "auto":
        kinds = ["exact" if d <= config.exact_max_dim else "sketch" for d in dims]
    else:
        kinds = [config.statistics] * len(dims)
    budget = None if config.statistics_budget_mb is None else config.statistics_budget_mb * MB
    while True:
        nbytes = [statistic_bytes(k, d, size, element) for k, d in zip(kinds, dims)]
        owners = assign_owners(nbytes, world_size)
        plans = [
            GroupPlan(k, None if k == "exact" else min(size, d), o, b)
            for k, d, o, b in zip(kinds, dims, owners, nbytes)
        ]
        loads = rank_loads(plans, dims, size, world_size, element)
        over = {r for r in range(world_size) if budget is not None and loads[r] > budget}
        if not over:
            return plans
        movable = [
            i
            for i, (k, o) in enumerate(zip(kinds, owners))
            if k == "exact" and o in over and config.statistics == "auto"
        ]
        if not movable:
            worst = max(over, key=lambda r: loads[r])
            raise ValueError(
                _budget_message(config, worst, loads[worst], kinds, dims, owners, names)
            )
        kinds[max(movable, key=lambda i: (nbytes[i], -i))] = "sketch"


def _budget_message(
    config: Any,
    rank: int,
    load: int,
    kinds: list[str],
    dims: Sequence[int],
    owners: list[int],
    names: Sequence[str] | None,
) -> str:
    mine = [i for i, o in enumerate(owners) if o == rank]
    widest = max(mine, key=lambda i: dims[i])
    label = names[widest] if names is not None else f"group {widest}"
    what = (
        "exact statistics (statistics='exact')"
        if config.statistics == "exact"
        else f"sketches of size {config.resolved_sketch_size}"
    )
    return (
        f"statistics_budget_mb={config.statistics_budget_mb:g} is too small: rank {rank} needs "
        f"{load / MB:.1f} MB for its {len(mine)} group(s) as {what} (widest: {label}, width "
        f"{dims[widest]}); "
        "raise the budget, lower sketch_size, use statistics='sketch' or 'auto', or run on more "
        "processes"
    )
