"""From an EvaState to a PEFT LoRA model: rank/alpha patterns, A filled, B = 0.

Also the Table 7 ablations (whiten, perm, rot, redist_only), applied when A is built so that an
EvaState on disk always holds the plain components.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .capture import SUPPORTED_LAYERS, in_features
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
                raise ValueError(f"layer {name}: whitening needs positive eigenvalues, this state has {scale.tolist()}")
            rows = rows / scale.sqrt().to(rows).unsqueeze(1)
        out[name] = _ablate(rows, config.init_mode, generator)
    return out


def _ablate(rows: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
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


def check_state_matches(model: nn.Module, state: EvaState) -> None:
    """Raise naming the first layer whose name, type or shape differs between state and model."""
    if hasattr(model, "peft_config"):
        raise TypeError("apply_eva_state expects the base model, not a PeftModel")
    modules = dict(model.named_modules())
    for name, (width, out) in state.layer_shapes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the EVA state was computed for another model: layer {name!r} is not in this model")
        if not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(f"the EVA state was computed for another model: {name} is a {type(module).__name__}")
        actual_out = module.out_features if isinstance(module, nn.Linear) else int(module.weight.shape[1])
        if in_features(module) != width or (out != -1 and actual_out != out):
            raise ValueError(f"the EVA state was computed for another model: layer {name} has shape "
                             f"[in={in_features(module)}, out={actual_out}], the state expects [in={width}, out={out}]")


def lora_config_for(state: EvaState, lora_alpha: float = 1.0, **lora_kwargs: Any):
    """A ``peft.LoraConfig`` with EVA's targets, ``rank_pattern`` and (adjusted) ``alpha_pattern``."""
    from peft import LoraConfig

    r = state.config.rank
    targets = [n for n, k in state.ranks.items() if k > 0]
    if not targets:
        raise ValueError("every layer of this EVA state has rank 0: nothing to adapt")
    rslora = bool(lora_kwargs.get("use_rslora", False))
    rank_pattern = {n: k for n, k in state.ranks.items() if k > 0 and k != r}
    alpha_pattern = {}
    if state.config.adjust_alpha:
        for name, k in rank_pattern.items():
            # keep alpha / r (or alpha / sqrt(r) for rsLoRA) equal to its value at rank r
            alpha_pattern[name] = lora_alpha * (math.sqrt(k / r) if rslora else k / r)
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, init_lora_weights=True, **lora_kwargs)


def apply_eva_state(model: nn.Module, state: EvaState, lora_alpha: float = 1.0, *, use_dora: bool = False,
                    adapter_name: str = "default", **lora_kwargs: Any):
    """Wrap ``model`` in a ``peft.PeftModel`` whose LoRA A rows are EVA's components and B = 0.

    Extra keyword arguments go to ``LoraConfig`` (``lora_dropout``, ``use_rslora``, ...). Layers
    with rank 0 get no adapter. At initialisation the outputs equal the base model's.
    """
    from peft import get_peft_model

    check_state_matches(model, state)
    init = initial_lora_a(state)
    config = lora_config_for(state, lora_alpha, use_dora=use_dora, **lora_kwargs)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    base = peft_model.base_model.model
    with torch.no_grad():
        for name, rows in init.items():
            layer = base.get_submodule(name)
            weight = layer.lora_A[adapter_name].weight
            if tuple(weight.shape) != tuple(rows.shape):
                raise RuntimeError(
                    f"PEFT built A of shape {tuple(weight.shape)} for {name}, expected {tuple(rows.shape)}"
                )
            weight.copy_(rows.to(weight))
            layer.lora_B[adapter_name].weight.zero_()
    return peft_model
