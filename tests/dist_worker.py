"""Worker for tests/test_distributed.py: a gloo rank running compute_eva_state (not a test module).

    python dist_worker.py RANK WORLD INIT_FILE OUT_DIR SCENARIO

Scenarios: sharded, sketch (sharded with sketches), replicated, crash (rank 1 fails on its 3rd
batch), fsdp (model sharded with torch's fully_shard), accelerate-fsdp (sharded by accelerate's
FSDP2 preparation). Each rank writes ``rank<r>.json`` (and its state under ``rank<r>/``).
"""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402

N_BATCHES = 8


def config(scenario: str):
    from eva_lora import EvaConfig

    extra = {"statistics": "sketch", "sketch_size": 10} if scenario == "sketch" else {}
    return EvaConfig(rank=4, rho=2.0, tau=0.999999, max_batches=100, stats_dtype="float64", **extra)


def batches():
    return helpers.token_batches(helpers.VOCAB, N_BATCHES, batch=4, seq=16)


def shard_with_fsdp(model, scenario: str):
    """fully_shard every decoder block and the root, directly or via accelerate's FSDP2 prepare."""
    if scenario == "accelerate-fsdp":
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        accelerator = Accelerator(cpu=True)
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            reshard_after_forward=True,
        )
        return fsdp2_prepare_model(accelerator, model)
    from torch.distributed.fsdp import fully_shard

    inner = model.base_model.model if hasattr(model, "peft_config") else model
    for layer in inner.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def check_sharded_lora(state, scenario: str) -> dict:
    """Build the LoRA model with the state's ranks, shard it, write A into the shards, compare."""
    from peft import get_peft_model

    from eva_lora import lora_config_for, write_eva_weights

    base = helpers.tiny_llama()
    peft_model = get_peft_model(helpers.tiny_llama(), lora_config_for(state))
    peft_model = shard_with_fsdp(peft_model, "fsdp")
    write_eva_weights(peft_model, state)
    wanted = state.components
    worst = 0.0
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            full = module.lora_A["default"].weight.full_tensor()
            worst = max(worst, float((full - wanted[name].to(full)).abs().max()))
            assert float(module.lora_B["default"].weight.full_tensor().abs().max()) == 0.0
    ids = batches()[0]
    with torch.no_grad():
        out_gap = float((peft_model(**ids).logits - base(**ids).logits).abs().max())
    return {
        "max_a_error": worst,
        "max_output_change": out_gap,
        "a_is_dtensor": type(
            peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
        ).__name__
        == "DTensor",
    }


def main(rank: int, world: int, init_file: str, out_dir: str, scenario: str) -> None:
    from eva_lora import compute_eva_state

    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    out = Path(out_dir)
    try:
        forward_fn = None
        model = helpers.tiny_llama()
        data = iter(batches()) if scenario == "replicated" else iter(batches()[rank::world])
        if scenario in ("fsdp", "accelerate-fsdp"):
            model = shard_with_fsdp(model, scenario)
        if scenario == "crash":  # rank 1 fails on its 3rd batch

            def forward_fn(model, batch, calls=[0]):  # noqa: B006 - a counter local to this process
                calls[0] += 1
                if rank == 1 and calls[0] == 3:
                    raise RuntimeError("simulated failure on rank 1")
                return model(**batch)

        state = compute_eva_state(model, data, config(scenario), forward_fn=forward_fn)
        state.save(out / f"rank{rank}")
        # the root keeps its own params unsharded
        block_weight = model.model.layers[0].self_attn.q_proj.weight
        report = {
            "ok": True,
            "history": state.history,
            "is_dtensor": type(block_weight.data).__name__,
        }
        if scenario in ("fsdp", "accelerate-fsdp"):
            report.update(check_sharded_lora(state, scenario))
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    except BaseException as err:  # report, then exit non-zero like a real crashed rank
        (out / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "ok": False,
                    "type": type(err).__name__,
                    "error": str(err),
                    "trace": traceback.format_exc(),
                }
            )
        )
        raise SystemExit(1) from None
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
