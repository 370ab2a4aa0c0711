"""A drop-in for PEFT's EVA: ``get_eva_state_dict`` and ``initialize_lora_eva_weights`` with PEFT's
signatures and semantics, computed by eva-lora's engine.

    from peft import LoraConfig, EvaConfig, get_peft_model
    # was: from peft import ...
    from eva_lora import get_eva_state_dict, initialize_lora_eva_weights

    config = LoraConfig(r=16, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    peft_model = get_peft_model(model, config)
    initialize_lora_eva_weights(peft_model, dataloader)

What carries over from PEFT unchanged: the arguments (``forward_fn``, ``prepare_model_inputs_fn``,
``prepare_layer_inputs_fn`` as one function or a dict per layer, ``adapter_name``,
``gather_distributed_inputs``, ``show_progress_bar``), the configuration read from
``LoraConfig.eva_config`` (rho, tau, use_label_mask, label_mask_value, whiten,
adjust_scaling_factors), the returned keys and shapes, and the loading (PEFT's own loader updates
``rank_pattern`` / ``alpha_pattern`` and removes layers whose rank is 0).

What differs on purpose (to reproduce an old run, ``implementation="peft"`` runs PEFT's own code):
- the statistics: exact second moments or bounded sketches (``eva_lora.EvaConfig(statistics=...)``)
  instead of a randomized incremental PCA of exactly k components; convergence also requires the
  solver to vouch for an estimate (see ``eva_lora.convergence``);
- ``whiten`` divides each component by ``sqrt(eigenvalue)`` (``A x`` gets unit variance); PEFT
  divides by ``sqrt(singular value)``, which also depends on how many tokens were seen;
- the loop ends at ``max_batches`` (1000 by default) with a warning instead of cycling forever;
- under torch.distributed each layer group's rows go to one owner rank instead of every rank
  all-gathering every layer's activations (``gather_distributed_inputs=False``, PEFT's "same data on
  every rank" switch, maps to ``distributed_inputs="replicated"``).
Not supported: a ``rank_pattern`` in the incoming LoraConfig (per-layer budgets); it raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from copy import deepcopy
from typing import Any

import torch
from torch import nn

from .config import EvaConfig


def forward_fn_dict(model: nn.Module, inputs: Any) -> Any:
    """PEFT's default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> torch.Tensor:
    """PEFT's default: indices (nonzero) of the tokens entering the SVD (attention, label masks)."""
    if not isinstance(model_input, dict):
        raise TypeError(
            "When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary"
        )
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    if peft_config.eva_config.use_label_mask and ("labels" in model_input):
        mask = torch.logical_and(
            mask, model_input["labels"] != peft_config.eva_config.label_mask_value
        )
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: Any, layer_name: str
) -> torch.Tensor:
    """PEFT's default: the ``layer_input`` rows at the indices ``prepare_model_inputs_fn`` gave."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    elif not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
            f"{layer_name}, please provide a custom prepare_layer_inputs_fn"
        )
    return layer_input[model_input.T.unbind()]


def _default_layer_fn(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """PEFT's fallback when ``prepare_layer_inputs_fn=None``: every row, flattened to 2-D."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    return layer_input.reshape(-1, layer_input.shape[-1]) if layer_input.ndim > 2 else layer_input


def eva_config_from_peft(peft_config: Any, **overrides: Any) -> EvaConfig:
    """Our EvaConfig for a ``peft.LoraConfig`` (r, eva_config); ``overrides`` set our own fields."""
    peft_eva = peft_config.eva_config
    if peft_eva is None:
        from peft import EvaConfig as PeftEvaConfig

        peft_eva = PeftEvaConfig()
    if peft_config.rank_pattern:
        raise ValueError(
            "the eva-lora drop-in does not support a rank_pattern in the LoraConfig it is given "
            "(per-layer rank budgets); remove it, or pass implementation='peft'"
        )
    settings = dict(
        rank=peft_config.r,
        rho=float(peft_eva.rho),
        tau=float(peft_eva.tau),
        use_label_mask=peft_eva.use_label_mask,
        label_mask_value=peft_eva.label_mask_value,
        whiten=peft_eva.whiten,
        adjust_alpha=peft_eva.adjust_scaling_factors,
    )
    return EvaConfig(**{**settings, **overrides})


def _target_layers(model: nn.Module, peft_config: Any) -> dict[str, nn.Module]:
    """PEFT's choice of layers: a PeftModel's LoRA layers (hooked on their base layer), or the
    ``nn.Linear`` / ``Conv1D`` layers ``target_modules`` names in a plain model."""
    from peft.tuners.lora.eva import UNSUPPORTED_LORA_MODULES
    from peft.tuners.tuners_utils import check_target_module_exists

    from .targets import LINEAR_LAYERS

    if hasattr(model, "peft_config"):
        return {
            name: module.get_base_layer()
            for name, module in model.named_modules()
            if hasattr(module, "base_layer") and not isinstance(module, UNSUPPORTED_LORA_MODULES)
        }
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_LAYERS)  # PEFT's EVA: nn.Linear and Conv1D only
        and (peft_config.target_modules is None or check_target_module_exists(peft_config, name))
    }


def _token_selector(
    peft_config: Any,
    prepare_model_inputs_fn: Callable | None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None,
    names: Iterable[str],
) -> Callable[[torch.Tensor, Any, str], torch.Tensor]:
    """PEFT's two-stage input preparation (once per batch, then per layer) as one select_tokens."""
    per_layer: dict[str, Callable] = {}
    if isinstance(prepare_layer_inputs_fn, Mapping):
        per_layer = dict(prepare_layer_inputs_fn)
        unknown = sorted(set(per_layer) - set(names))
        if unknown:
            raise ValueError(
                "prepare_layer_inputs_fn is a mapping but the following module names were not "
                f"found in the model: {unknown}"
            )
    default = (
        _default_layer_fn
        if prepare_layer_inputs_fn is None or per_layer
        else prepare_layer_inputs_fn
    )
    cache: dict[int, Any] = {}

    def select(x: torch.Tensor, batch: Any, name: str) -> torch.Tensor:
        if id(batch) not in cache:  # once per batch, as PEFT does
            cache.clear()
            prepared = (
                prepare_model_inputs_fn(batch, peft_config)
                if prepare_model_inputs_fn
                else deepcopy(batch)
            )
            cache[id(batch)] = prepared
        return per_layer.get(name, default)((x,), cache[id(batch)], name)

    return select


def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: Any = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | Mapping[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    *,
    implementation: str = "eva-lora",
    eva_lora_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT's ``get_eva_state_dict``: layer name -> (rank, in_features) initial A, by eva-lora.

    ``implementation="peft"`` runs PEFT's own function (its exact numbers). ``eva_lora_config``
    sets our own EvaConfig fields (``statistics``, ``max_batches``, ``sketch_size``, ...).
    """
    if implementation == "peft":
        from peft import get_eva_state_dict as peft_get_eva_state_dict

        return peft_get_eva_state_dict(
            model,
            dataloader,
            peft_config,
            forward_fn,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            adapter_name,
            gather_distributed_inputs,
            show_progress_bar,
        )
    if implementation != "eva-lora":
        raise ValueError(f"implementation must be 'eva-lora' or 'peft', got {implementation!r}")
    if hasattr(model, "peft_config") and not _target_layers(model, peft_config):
        # PEFT's behaviour: LoRA layers EVA cannot initialise (embeddings, attention, convolutions)
        # keep their default init, and its loader says so; nothing to compute.
        warnings.warn(
            "none of the model's LoRA layers can be initialised by EVA (unsupported: "
            "Embedding, MultiheadAttention, convolutions); they keep init_lora_weights=True",
            UserWarning,
            stacklevel=2,
        )
        return {}
    state = compute_peft_style_state(
        model,
        dataloader,
        peft_config,
        forward_fn,
        prepare_model_inputs_fn,
        prepare_layer_inputs_fn,
        adapter_name,
        gather_distributed_inputs,
        show_progress_bar,
        eva_lora_config,
    )
    from .peft_bridge import peft_a_rows

    device = _device(model)
    # every layer, rank-0 ones as (0, in) like PEFT
    rows = peft_a_rows(state, prefix="", rank_zero=True)
    return {name: a.to(device) if device is not None else a for name, a in rows.items()}


def compute_peft_style_state(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: Any = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Any = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    eva_lora_config: Mapping[str, Any] | None = None,
):
    """The :class:`~eva_lora.EvaState` behind :func:`get_eva_state_dict`.

    It holds the ranks, spectra and history."""
    from .engine import compute_eva_state

    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("peft_config is required if model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    try:
        if len(dataloader) == 0:  # type: ignore[arg-type]
            raise ValueError("dataloader is empty")
    except TypeError:
        pass  # an iterator without a length: the engine reports an empty one itself
    mode = "auto" if gather_distributed_inputs else "replicated"
    config = eva_config_from_peft(
        peft_config, distributed_inputs=mode, **dict(eva_lora_config or {})
    )
    layers = _target_layers(model, peft_config)
    if not layers:
        raise ValueError(
            "no layer to initialise: the PeftModel has no LoRA layer / target_modules matched "
            "nothing"
        )
    select = _token_selector(peft_config, prepare_model_inputs_fn, prepare_layer_inputs_fn, layers)
    context = model.disable_adapter() if is_peft_model else nullcontext()
    with context:
        return compute_eva_state(
            model,
            dataloader,
            config,
            forward_fn=forward_fn or forward_fn_dict,
            select_tokens=select,
            progress=show_progress_bar,
            layers=layers,
        )


def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | Mapping[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    *,
    implementation: str = "eva-lora",
    eva_lora_config: Mapping[str, Any] | None = None,
) -> nn.Module:
    """PEFT's ``initialize_lora_eva_weights``: compute (or take) the state dict and load it into the
    PeftModel with PEFT's own loader (ranks, alpha patterns, rank-0 layers removed)."""
    if not hasattr(model, "peft_config"):
        raise ValueError("model must be a PeftModel")
    if len(model.active_adapters) > 1:
        raise ValueError(
            "`initialize_lora_eva_weights` currently only works with a single active adapter"
        )
    if model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError(
            "`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`"
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided")
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            None,
            forward_fn,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            adapter_name,
            gather_distributed_inputs,
            show_progress_bar,
            implementation=implementation,
            eva_lora_config=eva_lora_config,
        )
    from peft.tuners.lora.eva import _load_eva_state_dict

    with torch.no_grad():
        _load_eva_state_dict(model, dict(eva_state_dict), adapter_name)
    return model


def _device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None
