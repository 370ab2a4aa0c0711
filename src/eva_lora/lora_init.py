"""The initial LoRA ``A`` of each layer from an EVA state: components, maybe whitened or ablated.

Kept apart from the state file and the PEFT bridge so that both can use it without importing each
other. The paper's Table 7 ablations (perm, rot, redist_only) and whitening are applied here, when A
is built, so that a state on disk always holds the plain components.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .state import EvaState


def initial_lora_a(state: EvaState) -> dict[str, torch.Tensor]:
    """name -> (rank, in_features) float32 initial A for every layer with rank > 0."""
    config = state.config
    generator = torch.Generator().manual_seed(config.seed)
    out: dict[str, torch.Tensor] = {}
    components, values = state.components, state.eigenvalues
    for name, rank in state.ranks.items():
        if rank == 0:
            continue
        rows = components[name].to(torch.float32).clone()
        if config.whiten:
            scale = values[name][:rank]
            if not torch.isfinite(scale).all() or (scale <= 0).any():
                raise ValueError(
                    f"layer {name}: whitening needs positive eigenvalues, this state has "
                    f"{scale.tolist()}"
                )
            rows = rows / scale.sqrt().to(rows).unsqueeze(1)
        out[name] = ablate(rows, config.init_mode, generator)
    return out


def ablate(rows: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Table 7: perm keeps each row's values but scrambles their positions (scale kept, directions
    lost); rot rotates the rows by a random orthogonal matrix (norms kept, directions changed);
    redist_only draws A like PEFT's default LoRA init (kaiming-uniform, a = sqrt(5))."""
    if mode == "eva":
        return rows
    r, d = rows.shape
    if mode == "perm":
        order = torch.argsort(torch.rand(r, d, generator=generator), dim=1)
        return torch.gather(rows, 1, order)
    if mode == "rot":
        q, upper = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(upper)).unsqueeze(0)  # Haar-distributed rotation
        return (q.to(rows) @ rows).contiguous()
    if mode == "redist_only":
        bound = 1.0 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)) on a (r, d) weight
        return (torch.rand(r, d, generator=generator) * 2 - 1) * bound
    raise ValueError(f"unknown init_mode {mode!r}")
