"""What a user should check before trusting an EVA initialisation, from the state alone.

Per group: the explained-variance fraction its rank captures, the batch at which it met the
convergence rule, and a *half-data agreement*: 1 - the subspace loss of the components estimated on
at most half of the tokens, measured against the final statistic at the last check (1: the first
half already gave the same subspace; low: the components still move with more data, so more batches
or a lower rank would be safer). For the run: how many tokens the masks kept. A label mask that
keeps every token marks nothing as ignored (the prompts enter the PCA: PEFT's label mask silently
did that for 18 months), and batches with no token left say the masks remove too much. :func:`flags`
turns these into warnings.
"""

from __future__ import annotations

from typing import Any

LOW_AGREEMENT = 0.9  # below this the components were still moving at the last check


def group_rows(state: Any) -> list[dict[str, Any]]:
    """One row per group: layers, rank, captured fraction, stop batch, agreement, tokens.

    The rank is the group's largest layer's."""
    rows = []
    stability = state.group_stability or [None] * len(state.groups)
    stops = state.group_stop_batches or [None] * len(state.groups)
    for g, names in enumerate(state.groups):
        rank = max(state.ranks.get(n, 0) for n in names)
        captured = float(state.group_ratios[g][:rank].sum()) if rank else 0.0
        rows.append(
            {
                "layers": list(names),
                "rank": rank,
                "captured": round(captured, 6),
                "stop_batch": stops[g],
                "agreement": stability[g],
                "tokens": state.group_tokens[g],
            }
        )
    return rows


def flags(state: Any, low: float = LOW_AGREEMENT) -> list[str]:
    """Warnings a user should read, one line each (empty when nothing looks wrong)."""
    out = []
    counts = state.token_counts or {}
    if counts.get("label_masked_batches"):
        if counts.get("kept") == counts.get("tokens"):
            out.append(
                f"the label mask kept every one of {counts['tokens']} tokens: the labels mark "
                "nothing as ignored (label_mask_value), so prompt tokens enter the PCA"
            )
        if counts.get("empty_batches"):
            out.append(
                f"{counts['empty_batches']} of {counts['batches']} batches had no token left after "
                "the attention and label masks"
            )
    weak = [
        r
        for r in group_rows(state)
        if r["rank"] and r["agreement"] is not None and r["agreement"] < low
    ]
    if weak:
        worst = min(weak, key=lambda r: r["agreement"])
        out.append(
            f"{len(weak)} group(s) have a half-data agreement below {low} (lowest "
            f"{worst['agreement']:.3f} at {worst['layers'][0]}): their components still moved "
            "with more data; feed more batches (max_batches) or use a lower rank"
        )
    return out


def summary_lines(state: Any) -> list[str]:
    """A few lines for a terminal or a model card."""
    rows = [r for r in group_rows(state) if r["rank"]]
    if not rows:
        return ["no layer got a rank"]
    captured = sorted(r["captured"] for r in rows)
    agreement = sorted(r["agreement"] for r in rows if r["agreement"] is not None)
    stops = sorted(r["stop_batch"] for r in rows if r["stop_batch"] is not None)
    counts = state.token_counts or {}
    middle = captured[len(captured) // 2]
    lines = [f"variance captured by each group's rank: min {captured[0]:.3f}, median {middle:.3f}"]
    if agreement:
        lines.append(
            f"half-data agreement: min {agreement[0]:.3f}, median "
            f"{agreement[len(agreement) // 2]:.3f}"
        )
    lines.append(
        f"groups that met the rule: {len(stops)} of {len(rows)}"
        + (f" (batches {stops[0]}-{stops[-1]})" if stops else "")
    )
    if counts.get("tokens") is not None:
        lines.append(
            f"tokens kept by the masks: {counts['kept']} of {counts['tokens']}"
            + (" (label mask applied)" if counts.get("label_masked_batches") else "")
        )
    return lines + [f"warning: {text}" for text in flags(state)]
