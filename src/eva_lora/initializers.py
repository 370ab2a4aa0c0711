"""One registry of LoRA initialisations, for training and comparisons.

Methods PEFT implements come from PEFT (LoRA, DoRA, PiSSA, OLoRA, CorDA, LoRA-GA, AdaLoRA); the EVA
family comes from this package. Every method adapts exactly the same layers (EVA's target
resolution), so a comparison differs only in the initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import find_target_layers
from .config import EvaConfig
from .engine import compute_eva_state
from .peft_bridge import apply_eva_state
from .state import EvaState


@dataclass(frozen=True)
class LoraSettings:
    """What every method shares: rank budget, alpha, dropout, the PEFT task type."""

    rank: int = 8
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    task_type: str | None = None  # "SEQ_CLS" trains the classification head too; "CAUSAL_LM"
    total_steps: int = 100  # AdaLoRA's schedule needs the number of optimiser steps


@dataclass(frozen=True)
class InitMethod:
    """name: CLI name; eva_mode: EVA ablation (None for PEFT methods); weight_changing: PiSSA-like
    methods that rewrite the base weights (their adapters are converted to plain LoRA on save)."""

    name: str
    description: str
    eva: dict[str, Any] | None = None
    use_dora: bool = False
    peft_init: Any = True
    weight_changing: bool = False
    needs_data: bool = False


INIT_METHODS: dict[str, InitMethod] = {m.name: m for m in [
    InitMethod("lora", "random A (kaiming-uniform), B = 0 (PEFT default)"),
    InitMethod("eva", "EVA: A = top right-singular vectors of the layer inputs, ranks redistributed",
               eva={}, needs_data=True),
    InitMethod("eva-dora", "EVA initialisation with DoRA", eva={}, use_dora=True, needs_data=True),
    InitMethod("dora", "DoRA with random A (PEFT)", use_dora=True),
    InitMethod("pissa", "PiSSA: principal singular vectors of W (PEFT), base weights become the residual",
               peft_init="pissa", weight_changing=True),
    InitMethod("olora", "OLoRA: QR of W (PEFT), base weights become the residual", peft_init="olora",
               weight_changing=True),
    InitMethod("corda", "CorDA (PEFT, instruction-previewed mode) from the covariance of the data",
               peft_init="corda", weight_changing=True, needs_data=True),
    InitMethod("lora-ga", "LoRA-GA (PEFT): A and B from the SVD of estimated gradients", peft_init="lora_ga",
               weight_changing=True, needs_data=True),
    InitMethod("adalora", "AdaLoRA (PEFT): SVD-parametrised adapters, ranks pruned during training"),
    InitMethod("eva-whiten", "ablation: EVA with A scaled by 1/sqrt(eigenvalue)", eva={"whiten": True},
               needs_data=True),
    InitMethod("eva-perm", "ablation: EVA ranks, A's entries permuted per row", eva={"init_mode": "perm"},
               needs_data=True),
    InitMethod("eva-rot", "ablation: EVA ranks, A rotated randomly", eva={"init_mode": "rot"}, needs_data=True),
    InitMethod("lora-redist", "ablation: EVA's ranks with random A", eva={"init_mode": "redist_only"},
               needs_data=True),
]}


def get_init_method(name: str) -> InitMethod:
    try:
        return INIT_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown init {name!r}; choose one of: {', '.join(INIT_METHODS)}") from None


def eva_config_for(method: InitMethod, eva: EvaConfig, rank: int) -> EvaConfig:
    """The EVA config of a method: the user's settings, the LoRA rank, the method's ablation."""
    return dataclasses.replace(eva, rank=rank, **(method.eva or {}))


def build_peft_model(model: nn.Module, method: InitMethod | str, settings: LoraSettings, eva: EvaConfig,
                     batches: Callable[[], Iterable[Any]] | None = None, eva_state: EvaState | None = None,
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> tuple[Any, EvaState | None]:
    """Wrap ``model`` in a PeftModel initialised by ``method``; returns (peft_model, eva_state or None).

    batches() yields the initialisation batches (SVD batch size) for data-driven methods;
    eva_state, when given, is used instead of computing one. loss_fn(model, batch) is LoRA-GA's loss.
    """
    method = get_init_method(method) if isinstance(method, str) else method
    eva = eva_config_for(method, eva, settings.rank)
    if method.needs_data and eva_state is None and batches is None:
        raise ValueError(f"init {method.name} needs data: pass batches")
    if method.eva is not None:
        if eva_state is None:
            eva_state = compute_eva_state(model, batches(), eva)
        else:
            eva_state = dataclasses.replace(eva_state, config=dataclasses.replace(
                eva_state.config, **(method.eva or {})))
        peft_model = apply_eva_state(model, eva_state, settings.lora_alpha, use_dora=method.use_dora,
                                     lora_dropout=settings.lora_dropout, task_type=settings.task_type)
        return peft_model, eva_state
    targets = sorted(find_target_layers(model, eva))
    if method.name == "adalora":
        return _adalora(model, settings, targets), None
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets, init_lora_weights=method.peft_init, use_dora=method.use_dora,
                        task_type=settings.task_type, **_extra_configs(method))
    if method.name == "corda":
        _preprocess_corda(model, config, batches)
    elif method.name == "lora-ga":
        _preprocess_lora_ga(model, config, batches, loss_fn)
    return get_peft_model(model, config), None


def _extra_configs(method: InitMethod) -> dict[str, Any]:
    if method.name == "corda":
        from peft.tuners.lora.config import CordaConfig

        return {"corda_config": CordaConfig(corda_method="ipm")}
    if method.name == "lora-ga":
        from peft.tuners.lora.config import LoraGAConfig

        return {"lora_ga_config": LoraGAConfig()}
    return {}


def _preprocess_corda(model: nn.Module, config: Any, batches: Callable[[], Iterable[Any]]) -> None:
    from peft.tuners.lora.corda import preprocess_corda

    def run_model() -> None:
        # PEFT's CorDA hooks take one sequence per call (input[0].squeeze(0)): feed unpadded rows.
        with torch.no_grad():
            for batch in batches():
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    keep = mask.bool()
                    model(input_ids=ids[keep].unsqueeze(0), attention_mask=mask[keep].unsqueeze(0))

    preprocess_corda(model, config, run_model=run_model)


def _preprocess_lora_ga(model: nn.Module, config: Any, batches: Callable[[], Iterable[Any]],
                        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None) -> None:
    from peft.tuners.lora.loraga import preprocess_loraga

    loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)

    def train_step() -> None:
        for batch in batches():
            with torch.enable_grad():
                loss_fn(model, batch).backward()

    was_training = model.training
    model.train()
    preprocess_loraga(model, config, train_step=train_step)
    model.zero_grad(set_to_none=True)
    model.train(was_training)


def _adalora(model: nn.Module, settings: LoraSettings, targets: list[str]) -> Any:
    from peft import AdaLoraConfig, get_peft_model

    steps = max(settings.total_steps, 10)
    config = AdaLoraConfig(init_r=round(settings.rank * 1.5), target_r=settings.rank, lora_alpha=settings.lora_alpha,
                           lora_dropout=settings.lora_dropout, target_modules=targets, total_step=steps,
                           tinit=steps // 10, tfinal=steps // 5, deltaT=max(steps // 20, 1),
                           task_type=settings.task_type)
    return get_peft_model(model, config)

