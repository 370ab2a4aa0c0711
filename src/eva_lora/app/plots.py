"""Figures: rank distribution heat map (paper Figure 9), EVA convergence, training-loss curves.

The only matplotlib user (Agg backend, no display). Every figure is written to a temporary file
and renamed, like every other file this tool writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_path
from ..state import EvaState

_LAYER = re.compile(r"^(.*?)\.?(\d+)\.(.+)$")


def rank_table(ranks: Mapping[str, int]) -> tuple[list[int], list[str], list[list[float]]]:
    """(layer indices, module types, matrix[type][layer]) from names like
    ``...layers.3.self_attn.q_proj``.

    Layers without a block index (a pooler) become their own row at index -1; missing cells are NaN.
    """
    cells: dict[tuple[str, int], int] = {}
    for name, rank in ranks.items():
        match = _LAYER.match(name)
        index, kind = (int(match.group(2)), match.group(3)) if match else (-1, name)
        cells[(kind, index)] = rank
    layers = sorted({i for _, i in cells})
    kinds = sorted({k for k, _ in cells})
    matrix = [[float(cells.get((k, i), float("nan"))) for i in layers] for k in kinds]
    return layers, kinds, matrix


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a PNG under a temporary name and rename it: a killed run never leaves half a figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rank_heatmap(state: EvaState, path: str | Path, title: str | None = None) -> Path:
    """Ranks per layer (columns) and module type (rows), annotated; 0 means no adapter."""
    return plot_ranks(
        state.ranks,
        path,
        title or f"EVA ranks (r={state.config.rank}, rho={state.config.rho})",
        state.config.max_components,
    )


def plot_ranks(
    ranks: Mapping[str, int], path: str | Path, title: str, vmax: int | None = None
) -> Path:
    """The rank heat map from a ranks dict (an EVA state's, or read from any adapter's weights)."""
    plt = pyplot()
    layers, kinds, matrix = rank_table(ranks)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(layers), 0.9 + 0.42 * len(kinds)))
    image = ax.imshow(
        matrix, cmap="viridis", aspect="auto", vmin=0, vmax=vmax or max(ranks.values())
    )
    ax.set_xticks(range(len(layers)), [str(i) if i >= 0 else "-" for i in layers])
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    for row, values in enumerate(matrix):
        for col, value in enumerate(values):
            if value == value:  # not NaN
                ax.text(col, row, f"{int(value)}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_convergence(state: EvaState, path: str | Path) -> Path:
    """Converged / needed components against batches and seconds, and when each group met the rule
    (from the state's history and per-group stop batches)."""
    plt = pyplot()
    history = state.history
    if not history:
        raise ValueError("this EVA state has no convergence history to plot")
    batches = [h["batch"] for h in history]
    share = [h["converged_components"] / max(h["needed_components"], 1) for h in history]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.2))
    left.plot(batches, share, marker=".")
    left.set_xlabel("batches")
    left.set_ylabel("share of needed components converged")
    middle.plot([h["seconds"] for h in history], share, marker=".", color="tab:orange")
    middle.set_xlabel("seconds")
    middle.sharey(left)
    stops = state.group_stop_batches or [None] * len(state.groups)
    met = sorted(s for s in stops if s is not None)
    right.step([0] + met, [0] + list(range(1, len(met) + 1)), where="post", color="tab:green")
    right.axhline(len(stops), color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("batch at which the group met the rule")
    right.set_ylabel(f"groups ({len(met)} of {len(stops)} met it)")
    fig.suptitle(
        f"EVA convergence (tau={state.config.tau}): stop = {state.stop_reason} "
        f"after {state.n_batches} batches"
    )
    fig.tight_layout()
    return save_figure(fig, path)


def plot_diagnostics(state: EvaState, path: str | Path) -> Path:
    """Per group (in model order): the variance its rank captures and its half-data agreement
    (diagnostics.py), with the agreement's warning level; the run's mask counts in the title."""
    from ..diagnostics import LOW_AGREEMENT, group_rows

    plt = pyplot()
    rows = [r for r in group_rows(state) if r["rank"]]
    if not rows:
        raise ValueError("no layer of this EVA state got a rank: nothing to diagnose")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.2))
    left.bar(range(len(rows)), [r["captured"] for r in rows], color="tab:blue")
    left.set_xlabel("layer group (model order)")
    left.set_ylabel("variance captured by its rank")
    agreement = [r["agreement"] if r["agreement"] is not None else float("nan") for r in rows]
    right.plot(range(len(rows)), agreement, marker=".", linestyle="", color="tab:green")
    right.axhline(
        LOW_AGREEMENT,
        color="tab:red",
        linestyle=":",
        linewidth=1,
        label=f"warning below {LOW_AGREEMENT}",
    )
    right.set_ylim(0, 1.02)
    right.set_xlabel("layer group (model order)")
    right.set_ylabel("half-data agreement")
    right.legend(loc="lower left")
    counts = state.token_counts or {}
    kept = (
        f"; masks kept {counts['kept']} of {counts['tokens']} tokens"
        if counts.get("tokens")
        else ""
    )
    fig.suptitle(f"EVA diagnostics: {len(rows)} groups{kept}")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, key: str = "loss"
) -> Path:
    """One line per run label from Trainer log entries ({"step", "loss", "grad_norm"})."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, log in runs.items():
        points = [(e["step"], e[key]) for e in log if key in e]
        if points:
            ax.plot(*zip(*points), label=label, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.legend()
    ax.set_title(f"training {key.replace('_', ' ')}")
    return save_figure(fig, path)
