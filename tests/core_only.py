"""The core without the app's extras: run in a venv with only torch, safetensors, numpy and tqdm.

    python tests/core_only.py        # `make test-core` builds that venv and runs this

Computes an EVA state for a plain torch model, saves and reloads it, and checks that nothing from
the application's dependencies was needed (they are not installed there) or imported.
"""

from __future__ import annotations

import sys
import tempfile

import torch

import eva_lora
from eva_lora import EvaConfig, EvaState, compute_eva_state

APP_DEPS = (
    "transformers",
    "peft",
    "datasets",
    "yaml",
    "sklearn",
    "scipy",
    "matplotlib",
    "math_verify",
    "accelerate",
)


def main() -> int:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 8)
    ).eval()
    scale = torch.linspace(4.0, 0.2, 24)
    batches = [torch.randn(64, 24, generator=g) * scale for _ in range(20)]
    state = compute_eva_state(model, batches, EvaConfig(rank=2, rho=2.0, tau=0.99), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        again = EvaState.load(state.save(tmp))
    assert again.ranks == state.ranks and sum(state.ranks.values()) == 2 * 2
    imported = [name for name in APP_DEPS if name in sys.modules]
    assert not imported, f"the core imported application dependencies: {imported}"
    print(
        f"eva-lora {eva_lora.__version__} core: {len(state.ranks)} layers, ranks {state.ranks}, "
        f"stop {state.stop_reason} after {state.n_batches} batches; imported no application "
        "dependency"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
