"""eva-lora: Explained Variance Adaptation (EVA), a data-driven initialisation for LoRA.

    from eva_lora import EvaConfig, compute_eva_state, EvaState, apply_eva_state
    state = compute_eva_state(model, batches, EvaConfig(rank=16, rho=2.0))
    peft_model = apply_eva_state(model, state, lora_alpha=1.0)
"""

from .allocation import allocate_ranks, rank_scores
from .config import EvaConfig
from .engine import EvaNotConvergedError, compute_eva_state
from .peft_bridge import apply_eva_state, initial_lora_a, lora_config_for
from .state import EvaState, StateFileError

__all__ = [
    "EvaConfig",
    "EvaNotConvergedError",
    "EvaState",
    "StateFileError",
    "allocate_ranks",
    "apply_eva_state",
    "compute_eva_state",
    "initial_lora_a",
    "lora_config_for",
    "rank_scores",
]
__version__ = "0.1.0"
