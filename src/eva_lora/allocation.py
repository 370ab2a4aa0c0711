"""Rank redistribution: give the global budget to the components that explain the most variance.

Pure functions over tensors and dicts; no model, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def rank_scores(values: torch.Tensor, total_variance: float, metric: str) -> torch.Tensor:
    """Scores that make components of different layers comparable (paper Table 15).

    values: (k,) eigenvalues of one layer's covariance, largest first.
    ``ratio`` = eigenvalue / total variance of the layer (paper default), ``raw`` = eigenvalue,
    ``max`` = eigenvalue / the layer's largest eigenvalue.
    """
    values = values.to(torch.float64)
    if metric == "ratio":
        return values / max(float(total_variance), torch.finfo(torch.float64).tiny)
    if metric == "raw":
        return values.clone()
    if metric == "max":
        return values / values[:1].clamp_min(torch.finfo(torch.float64).tiny)
    raise ValueError(f"unknown rank metric {metric!r}; choose from ('ratio', 'raw', 'max')")


def allocate_ranks(
    scores: Mapping[str, torch.Tensor],
    budget: int,
    caps: Mapping[str, int],
    min_rank: int = 0,
) -> dict[str, int]:
    """Split ``budget`` ranks over layers by taking the highest-scoring components.

    scores: layer -> (k_l,) scores of its components, non-increasing. A layer receives a prefix
    of its components, at most ``caps[layer]`` (and at most k_l), at least ``min_rank`` where its
    cap allows. Ties go to the layer listed first, so the result is deterministic.
    Returns layer -> rank; ranks sum to ``min(budget, total capacity)``.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    names = list(scores)
    limits = {n: min(int(caps[n]), int(scores[n].numel())) for n in names}
    ranks = {n: min(min_rank, limits[n]) for n in names}
    remaining = budget - sum(ranks.values())
    if remaining < 0:
        raise ValueError(
            f"min_rank={min_rank} over {len(names)} layers exceeds the budget {budget}"
        )
    owners, values = [], []
    for index, name in enumerate(names):
        extra = scores[name].reshape(-1)[ranks[name] : limits[name]].to(torch.float64)
        values.append(extra)
        owners.append(torch.full((extra.numel(),), index, dtype=torch.long))
    if not values or remaining == 0:
        return ranks
    flat_values, flat_owners = torch.cat(values), torch.cat(owners)
    if torch.isnan(flat_values).any():
        raise ValueError("rank scores contain NaN")
    order = torch.sort(flat_values, descending=True, stable=True).indices[:remaining]
    # one read, not one per layer
    counts = torch.bincount(flat_owners[order], minlength=len(names)).tolist()
    for index, name in enumerate(names):
        ranks[name] += counts[index]
    return ranks
