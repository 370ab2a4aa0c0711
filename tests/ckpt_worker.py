"""Worker for tests/test_reliability.py: an EVA run checkpointing each batch (not a test module)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402

N_BATCHES = 24


def config():
    from eva_lora import EvaConfig

    return EvaConfig(rank=4, rho=2.0, tau=0.9999, max_batches=N_BATCHES)


def batches():
    return helpers.token_batches(helpers.VOCAB, N_BATCHES, batch=4, seq=16)


def model():
    return helpers.tiny_llama()


def main(out: str, resume: bool, delay: float) -> None:
    from eva_lora import compute_eva_state

    def slow_forward(m, batch):  # makes the kill land at different batches
        time.sleep(delay)
        return m(**batch)

    warnings.simplefilter("ignore")
    state = compute_eva_state(
        model(),
        iter(batches()),
        config(),
        forward_fn=slow_forward,
        checkpoint_dir=Path(out) / "ckpt",
        checkpoint_every=1,
        resume=resume,
    )
    state.save(Path(out) / "final")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "resume", float(sys.argv[3]))
