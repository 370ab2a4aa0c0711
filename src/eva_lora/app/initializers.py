"""One registry of LoRA initialisations, for training and comparisons.

Methods PEFT implements come from PEFT (LoRA, DoRA, PiSSA, OLoRA, CorDA, LoRA-GA, AdaLoRA); the EVA
family comes from this package. Every method adapts exactly the same layers (EVA's target
resolution), so a comparison differs only in the initialisation.

Each entry carries what it needs and does: its PEFT ``init_lora_weights`` value and extra config,
a ``prepare`` step run on the data before the adapters exist (CorDA, LoRA-GA), a custom ``build``
(AdaLoRA), trainer callbacks (AdaLoRA's rank schedule) and how many initialisation batches it may
read. Code elsewhere asks the entry; nobody compares method names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import EvaConfig
from ..engine import compute_eva_state
from ..peft_bridge import apply_eva_state
from ..state import EvaState
from ..targets import find_target_layers

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[Any]]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class LoraSettings:
    """What every method shares besides the rank (which is ``EvaConfig.rank``): alpha, dropout,
    the PEFT task type and the number of optimiser steps (AdaLoRA's schedule needs it)."""

    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    task_type: str | None = None  # "SEQ_CLS" trains the classification head too; "CAUSAL_LM"
    total_steps: int = 100


@dataclass(frozen=True)
class InitMethod:
    """A registered initialisation.

    eva: EVA settings this method overrides (None: not an EVA method). use_dora: DoRA adapters.
    peft_init: PEFT's ``init_lora_weights``. weight_changing: rewrites the base weights
    (PiSSA-like), so the saved adapter is converted to plain LoRA. calibration: reads
    ``calibration_batches`` batches (EVA instead stops on convergence). extra_config / prepare /
    build / callbacks: the method's own steps (see :func:`build_peft_model` and the trainer).
    """

    name: str
    description: str
    eva: dict[str, Any] | None = None
    use_dora: bool = False
    peft_init: Any = True
    weight_changing: bool = False
    calibration: bool = False
    extra_config: Callable[[], dict[str, Any]] = field(default=lambda: {})
    prepare: Callable[[nn.Module, Any, Batches, LossFn | None], None] | None = None
    build: Callable[[nn.Module, int, LoraSettings, list[str]], Any] | None = None
    callbacks: Callable[[Any], list[Any]] = field(default=lambda peft_model: [])

    @property
    def needs_data(self) -> bool:
        return self.eva is not None or self.calibration

    def batch_limit(self, calibration_batches: int) -> int | None:
        """Init batches the method may read: all of one pass for EVA, else a fixed number."""
        return calibration_batches if self.calibration else None


def _corda_config() -> dict[str, Any]:
    from peft.tuners.lora.config import CordaConfig

    return {"corda_config": CordaConfig(corda_method="ipm")}


def _lora_ga_config() -> dict[str, Any]:
    from peft.tuners.lora.config import LoraGAConfig

    return {"lora_ga_config": LoraGAConfig()}


def _prepare_corda(model: nn.Module, config: Any, batches: Batches, loss_fn: LossFn | None) -> None:
    from peft.tuners.lora.corda import preprocess_corda

    def run_model() -> None:
        # PEFT's CorDA hooks take one sequence per call (input[0].squeeze(0)): feed unpadded rows.
        with torch.no_grad():
            for batch in batches():
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                    keep = mask.bool()
                    model(input_ids=ids[keep].unsqueeze(0), attention_mask=mask[keep].unsqueeze(0))

    preprocess_corda(model, config, run_model=run_model)


def _prepare_lora_ga(
    model: nn.Module, config: Any, batches: Batches, loss_fn: LossFn | None
) -> None:
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


def _build_adalora(model: nn.Module, rank: int, settings: LoraSettings, targets: list[str]) -> Any:
    from peft import AdaLoraConfig, get_peft_model

    steps = max(settings.total_steps, 10)
    config = AdaLoraConfig(
        init_r=round(rank * 1.5),
        target_r=rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        total_step=steps,
        tinit=steps // 10,
        tfinal=steps // 5,
        deltaT=max(steps // 20, 1),
        task_type=settings.task_type,
    )
    return get_peft_model(model, config)


def _adalora_callbacks(peft_model: Any) -> list[Any]:
    from transformers import TrainerCallback

    class AdaLoraBudget(TrainerCallback):
        """AdaLoRA prunes ranks from the gradients after every optimiser step (PEFT's contract)."""

        def on_optimizer_step(self, args, state, control, **kwargs):
            peft_model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraBudget()]


INIT_METHODS: dict[str, InitMethod] = {
    m.name: m
    for m in [
        InitMethod("lora", "random A (kaiming-uniform), B = 0 (PEFT default)"),
        InitMethod(
            "eva",
            "EVA: A = top right-singular vectors of the layer inputs, ranks redistributed",
            eva={},
        ),
        InitMethod("eva-dora", "EVA initialisation with DoRA", eva={}, use_dora=True),
        InitMethod("dora", "DoRA with random A (PEFT)", use_dora=True),
        InitMethod(
            "pissa",
            "PiSSA: principal singular vectors of W (PEFT), base weights become the residual",
            peft_init="pissa",
            weight_changing=True,
        ),
        InitMethod(
            "olora",
            "OLoRA: QR of W (PEFT), base weights become the residual",
            peft_init="olora",
            weight_changing=True,
        ),
        InitMethod(
            "corda",
            "CorDA (PEFT, instruction-previewed mode) from the covariance of the data",
            peft_init="corda",
            weight_changing=True,
            calibration=True,
            extra_config=_corda_config,
            prepare=_prepare_corda,
        ),
        InitMethod(
            "lora-ga",
            "LoRA-GA (PEFT): A and B from the SVD of estimated gradients",
            peft_init="lora_ga",
            weight_changing=True,
            calibration=True,
            extra_config=_lora_ga_config,
            prepare=_prepare_lora_ga,
        ),
        InitMethod(
            "adalora",
            "AdaLoRA (PEFT): SVD-parametrised adapters, ranks pruned during training",
            build=_build_adalora,
            callbacks=_adalora_callbacks,
        ),
        InitMethod(
            "eva-whiten", "ablation: EVA with A scaled by 1/sqrt(eigenvalue)", eva={"whiten": True}
        ),
        InitMethod(
            "eva-perm",
            "ablation: EVA ranks, A's entries permuted per row",
            eva={"init_mode": "perm"},
        ),
        InitMethod("eva-rot", "ablation: EVA ranks, A rotated randomly", eva={"init_mode": "rot"}),
        InitMethod(
            "lora-redist", "ablation: EVA's ranks with random A", eva={"init_mode": "redist_only"}
        ),
    ]
}


def get_init_method(name: str) -> InitMethod:
    try:
        return INIT_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown init {name!r}; choose one of: {', '.join(INIT_METHODS)}"
        ) from None


def eva_config_for(method: InitMethod, eva: EvaConfig) -> EvaConfig:
    """The EVA config of a method: the user's settings with the method's ablation applied."""
    return dataclasses.replace(eva, **(method.eva or {}))


def check_state_settings(state: EvaState, eva: EvaConfig) -> None:
    """Refuse a given state whose rank budget differs from the run's: the adapter would silently get
    the state's ranks, not the ones asked for."""
    differ = [
        f"{key} {getattr(state.config, key)} (run: {getattr(eva, key)})"
        for key in ("rank", "rho")
        if getattr(state.config, key) != getattr(eva, key)
    ]
    if differ:
        raise ValueError(
            f"the EVA state was made with {', '.join(differ)}: compute a state with the run's "
            "settings, set them to the state's, or pass --force (force=True) to use the state's "
            "ranks"
        )


def build_peft_model(
    model: nn.Module,
    method: InitMethod | str,
    settings: LoraSettings,
    eva: EvaConfig,
    batches: Batches | None = None,
    eva_state: EvaState | None = None,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    strict: bool = False,
    force: bool = False,
) -> tuple[Any, EvaState | None]:
    """Wrap ``model`` in a PeftModel initialised by ``method`` at rank ``eva.rank``; returns
    (peft_model, eva_state or None).

    batches() yields the initialisation batches (SVD batch size) for data-driven methods;
    eva_state, when given, is used instead of computing one; it must have been made with the
    run's rank and rho and cover the model (else ValueError; ``force=True`` accepts it as it is).
    loss_fn(model, batch) is LoRA-GA's loss.
    """
    method = get_init_method(method) if isinstance(method, str) else method
    eva = eva_config_for(method, eva)
    if method.needs_data and eva_state is None and batches is None:
        raise ValueError(f"init {method.name} needs data: pass batches")
    if method.eva is not None:
        if eva_state is None:
            eva_state = compute_eva_state(model, batches(), eva, progress=progress, strict=strict)
        else:
            if not force:
                check_state_settings(eva_state, eva)
            eva_state = dataclasses.replace(
                eva_state, config=dataclasses.replace(eva_state.config, **method.eva)
            )
        peft_model = apply_eva_state(
            model,
            eva_state,
            settings.lora_alpha,
            use_dora=method.use_dora,
            lora_dropout=settings.lora_dropout,
            task_type=settings.task_type,
            force=force,
        )
        return peft_model, eva_state
    targets = sorted(find_target_layers(model, eva))
    if method.build is not None:
        return method.build(model, eva.rank, settings, targets), None
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=eva.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        init_lora_weights=method.peft_init,
        use_dora=method.use_dora,
        task_type=settings.task_type,
        **method.extra_config(),
    )
    if method.weight_changing:
        untie_shared_weights(model, targets)
    if method.prepare is not None:
        method.prepare(model, config, batches, loss_fn)
    return get_peft_model(model, config), None


def untie_shared_weights(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Give each target whose weight another module shares (tied LM head) its own copy; return them.

    PiSSA-like inits write the residual ``W - BA`` into the target's base weight. A head tied to the
    input embeddings shares that tensor, so without a copy the token embeddings silently become the
    residual as well (PEFT 0.21 does so; it only warns about ``ensure_weight_tying``). The copy
    leaves the model's function unchanged, and the saved adapter is converted to apply to the
    original, still tied weights, so loading it is unaffected. Costs one extra copy of the head's
    weight.
    """
    sharers: dict[int, set[int]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            sharers.setdefault(id(param), set()).add(id(module))
    untied = []
    for name in targets:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and len(sharers.get(id(weight), ())) > 1:
            module.weight = nn.Parameter(
                weight.detach().clone(), requires_grad=weight.requires_grad
            )
            untied.append(name)
    if untied:
        config = getattr(model, "config", None)
        for part in {
            id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())
        }.values():
            if part is not None and getattr(part, "tie_word_embeddings", False):
                # a later tie_weights() must not tie the residual back
                part.tie_word_embeddings = False
        logger.info(
            "gave %s its own weight (it was tied to another module; the init rewrites it)",
            ", ".join(untied),
        )
    return untied
