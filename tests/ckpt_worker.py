"""Worker for tests/test_reliability.py: an EVA run that checkpoints every batch (not a test module)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

N_BATCHES = 24


def config():
    from eva_lora import EvaConfig

    return EvaConfig(rank=4, rho=2.0, tau=0.9999, max_batches=N_BATCHES, progress=False)


def batches():
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import token_batches

    return token_batches(101, N_BATCHES, batch=4, seq=16)


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def main(out: str, resume: bool, delay: float) -> None:
    from eva_lora import compute_eva_state

    def slow_forward(m, batch):  # makes the kill land at different batches
        time.sleep(delay)
        return m(**batch)

    warnings.simplefilter("ignore")
    state = compute_eva_state(model(), iter(batches()), config(), forward_fn=slow_forward,
                              checkpoint_dir=Path(out) / "ckpt", checkpoint_every=1, resume=resume)
    state.save(Path(out) / "final")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "resume", float(sys.argv[3]))
