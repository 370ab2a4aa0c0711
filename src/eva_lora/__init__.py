"""eva-lora: Explained Variance Adaptation (EVA), a data-driven initialisation for LoRA.

    from eva_lora import EvaConfig, compute_eva_state, EvaState, apply_eva_state
    state = compute_eva_state(model, batches, EvaConfig(rank=16, rho=2.0))
    peft_model = apply_eva_state(model, state, lora_alpha=1.0)

The application on top of the core (CLI, recipes, tasks) is :mod:`eva_lora.app`.
"""

from .allocation import allocate_ranks, rank_scores
from .config import EvaConfig, InitOptions
from .engine import EvaNotConvergedError, compute_eva_state
from .lora_init import initial_lora_a
from .model_card import save_adapter
from .peft_bridge import (
    apply_eva_state,
    lora_config_for,
    peft_a_rows,
    state_from_peft_state_dict,
    write_eva_weights,
)
from .peft_compat import get_eva_state_dict, initialize_lora_eva_weights
from .state import EvaState, StateFileError

__all__ = [
    "EvaConfig",
    "InitOptions",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "save_adapter",
    "EvaNotConvergedError",
    "EvaState",
    "StateFileError",
    "allocate_ranks",
    "apply_eva_state",
    "compute_eva_state",
    "initial_lora_a",
    "lora_config_for",
    "peft_a_rows",
    "state_from_peft_state_dict",
    "rank_scores",
    "write_eva_weights",
]
__version__ = "0.2.0"
