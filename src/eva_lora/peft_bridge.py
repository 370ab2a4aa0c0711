"""From an EvaState to a PEFT LoRA model: rank/alpha patterns, A filled, B = 0.

``apply_eva_state`` builds the PEFT model from a base model. ``write_eva_weights`` fills an existing
PEFT model whose adapters already have the state's ranks, including one sharded with FSDP2 (its LoRA
weights are DTensors) or DeepSpeed ZeRO-3 (gathered with PEFT's ``gather_params_ctx``), which is how
a model too large for one device gets its EVA initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import EvaConfig
from .lora_init import initial_lora_a
from .state import EvaState
from .targets import SUPPORTED_LAYERS, find_target_layers, in_features, out_features

PEFT_PREFIX = "base_model.model."  # how a PeftModel names the base model's modules
IMPORTED_FROM_PEFT = "imported_from_peft"  # stop_reason of a state wrapped from PEFT's rows


def peft_a_rows(
    state: EvaState, prefix: str = PEFT_PREFIX, rank_zero: bool = False
) -> dict[str, torch.Tensor]:
    """The one path from a state to PEFT's EVA state dict: ``prefix + name`` -> initial A rows.

    Rows are whitened / ablated as the state's config says (:func:`~eva_lora.initial_lora_a`);
    ``peft.initialize_lora_eva_weights(model, eva_state_dict=...)`` loads the result. With
    ``rank_zero``, layers of rank 0 are included as (0, in_features) tensors, as PEFT's own
    ``get_eva_state_dict`` returns them.
    """
    rows = initial_lora_a(state)
    out = {}
    for name in state.ranks:
        if name in rows:
            out[prefix + name] = rows[name]
        elif rank_zero:
            out[prefix + name] = torch.zeros(0, state.layer_shapes[name][0])
    return out


def state_from_peft_state_dict(
    state_dict: dict[str, torch.Tensor],
    config: EvaConfig | None = None,
    layer_shapes: dict[str, list[int]] | None = None,
) -> EvaState:
    """Wrap PEFT's ``get_eva_state_dict`` output in an EvaState; spectra are unknown (NaN).

    Each layer becomes its own group and its rank is its number of rows. ``layer_shapes``
    (name -> [in, out]) makes the state checkable against a model; without it the output
    width is recorded as -1.
    """
    if not state_dict:
        raise ValueError("the PEFT EVA state dict is empty")
    names, comps = [], []
    for key, rows in state_dict.items():
        names.append(key.removeprefix(PEFT_PREFIX))
        comps.append(rows.detach().to("cpu", torch.float32).reshape(-1, rows.shape[-1]))
    config = config or EvaConfig(
        rank=max(1, round(sum(c.shape[0] for c in comps) / len(comps))), whiten=False
    )
    nan = [torch.full((c.shape[0],), math.nan, dtype=torch.float64) for c in comps]
    shapes = layer_shapes or {n: [c.shape[1], -1] for n, c in zip(names, comps)}
    return EvaState(
        config=config,
        groups=[[n] for n in names],
        group_components=comps,
        group_eigenvalues=nan,
        group_ratios=[v.clone() for v in nan],
        group_tokens=[0] * len(names),
        ranks={n: c.shape[0] for n, c in zip(names, comps)},
        layer_shapes=shapes,
        stop_reason=IMPORTED_FROM_PEFT,
    )


def check_state_matches(model: nn.Module, state: EvaState, force: bool = False) -> None:
    """Raise naming the first layer whose name, type or shape differs between state and model.

    A state computed here also has to cover the model: every layer its own selection
    (``state.config.target_modules``) picks in this model must be in it, or a larger model of the
    same family would silently get no adapter on its extra layers. ``force=True`` skips that
    coverage test (layer shapes are always checked); states imported from PEFT carry no selection.
    """
    if hasattr(model, "peft_config"):
        raise TypeError("apply_eva_state expects the base model, not a PeftModel")
    modules = dict(model.named_modules())
    for name, (width, out) in state.layer_shapes.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"the EVA state was computed for another model: layer {name!r} is not in this model"
            )
        if not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(
                f"the EVA state was computed for another model: {name} is a {type(module).__name__}"
            )
        actual_out = out_features(module)
        if in_features(module) != width or (out != -1 and actual_out != out):
            raise ValueError(
                f"the EVA state was computed for another model: layer {name} has shape "
                f"[in={in_features(module)}, out={actual_out}], the state expects [in={width}, "
                f"out={out}]"
            )
    if force or state.stop_reason == IMPORTED_FROM_PEFT:
        return
    extra = [n for n in find_target_layers(model, state.config) if n not in state.layer_shapes]
    if extra:
        raise ValueError(
            f"the EVA state was computed for another model: this model has {len(extra)} target "
            f"layer(s) the state does not cover (first: {extra[0]}), which would get no adapter; "
            "compute a state for this model, or pass force=True (CLI: --force) to adapt only the "
            "state's layers"
        )


def lora_config_for(state: EvaState, lora_alpha: float = 1.0, **lora_kwargs: Any):
    """``peft.LoraConfig`` with EVA's targets, ``rank_pattern`` and (adjusted) ``alpha_pattern``."""
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
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        **lora_kwargs,
    )


def apply_eva_state(
    model: nn.Module,
    state: EvaState,
    lora_alpha: float = 1.0,
    *,
    use_dora: bool = False,
    adapter_name: str = "default",
    force: bool = False,
    **lora_kwargs: Any,
):
    """Wrap ``model`` in a ``peft.PeftModel`` whose LoRA A rows are EVA's components and B = 0.

    Extra keyword arguments go to ``LoraConfig`` (``lora_dropout``, ``use_rslora``, ...). Layers
    with rank 0 get no adapter. At initialisation the outputs equal the base model's. The state
    must match the model (:func:`check_state_matches`; ``force=True`` accepts a state that covers
    only part of the model's target layers).
    """
    from peft import get_peft_model

    check_state_matches(model, state, force)
    config = lora_config_for(state, lora_alpha, use_dora=use_dora, **lora_kwargs)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    write_eva_weights(peft_model, state, adapter_name)
    return peft_model


def write_eva_weights(peft_model: Any, state: EvaState, adapter_name: str = "default") -> None:
    """Set each adapted layer's ``A`` to the state's initial rows and ``B`` to zero, in place.

    The adapters must already have the state's ranks (build them with :func:`lora_config_for`).
    Works on plain, FSDP2-sharded (DTensor) and ZeRO-3-partitioned LoRA weights; every process of a
    sharded model must call it (each writes its own shard).
    """
    base = peft_model.base_model.model
    init = initial_lora_a(state)
    with torch.no_grad():
        for name, rows in init.items():
            try:
                layer = base.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"the PEFT model has no layer {name!r} from the EVA state"
                ) from None
            if not hasattr(layer, "lora_A") or adapter_name not in layer.lora_A:
                raise ValueError(
                    f"layer {name} has no LoRA adapter {adapter_name!r}; build the PEFT model with "
                    "lora_config_for(state) before writing the EVA weights"
                )
            _write(layer.lora_A[adapter_name].weight, rows, name)
            _write(layer.lora_B[adapter_name].weight, None, name)


def _write(weight: torch.Tensor, rows: torch.Tensor | None, name: str) -> None:
    """Copy ``rows`` (or zeros) into a LoRA weight, whatever holds its storage."""
    from peft.utils.integrations import gather_params_ctx

    # ZeRO-3: gather, write on rank 0, re-partition
    with gather_params_ctx(weight, modifier_rank=0):
        shape = tuple(weight.shape)
        # a Conv2d's A: rows are flattened (C_in, kh, kw) kernels
        if rows is not None and weight.ndim == 4:
            rows = (
                rows.reshape(rows.shape[0], *shape[1:])
                if rows.shape[1] == weight[0].numel()
                else rows
            )
        if rows is not None and shape != tuple(rows.shape):
            raise ValueError(
                f"layer {name}: its LoRA A has shape {shape}, the EVA state gives "
                f"{tuple(rows.shape)}; "
                "build the PEFT model with lora_config_for(state) so the ranks match"
            )
        full = torch.zeros(shape) if rows is None else rows
        if _is_dtensor(weight):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(
                full.to(weight.dtype).to(weight.device_mesh.device_type),
                weight.device_mesh,
                weight.placements,
            )
            weight.to_local().copy_(full.to_local())
        else:
            weight.copy_(full.to(weight))


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"
