"""Worker for tests/test_distributed.py: one gloo rank running compute_eva_state (not a test module)."""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

import torch


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def main(rank: int, world: int, init_file: str, out_dir: str, scenario: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import token_batches
    from eva_lora import EvaConfig, compute_eva_state

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=30))
    out = Path(out_dir)
    try:
        batches = token_batches(101, 8, batch=4, seq=16)
        cfg = EvaConfig(rank=4, rho=2.0, tau=0.999999, max_batches=100, progress=False, stats_dtype="float64")
        forward_fn = None
        if scenario == "sharded":
            data = iter(batches[rank::world])
        elif scenario == "replicated":
            data = iter(batches)
        else:  # crash: rank 1 fails on its 3rd batch
            data = iter(batches[rank::world])

            def forward_fn(model, batch, calls=[0]):  # noqa: B006 - a counter local to this process
                calls[0] += 1
                if rank == 1 and calls[0] == 3:
                    raise RuntimeError("simulated failure on rank 1")
                return model(**batch)

        state = compute_eva_state(tiny_llama(), data, cfg, forward_fn=forward_fn)
        state.save(out / f"rank{rank}")
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": True, "history": state.history[-1]}))
    except BaseException as err:  # report, then exit non-zero like a real crashed rank
        (out / f"rank{rank}.json").write_text(json.dumps({"ok": False, "type": type(err).__name__,
                                                         "error": str(err), "trace": traceback.format_exc()}))
        raise SystemExit(1) from None
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
