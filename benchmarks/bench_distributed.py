"""EVA init with 1 vs N processes (gloo on CPU, NCCL on GPUs): time per rank and bytes communicated.

    # CPU, gloo; threads split between ranks
    python benchmarks/bench_distributed.py --procs 1 2
    python benchmarks/bench_distributed.py --procs 1 2 4 8 --device cuda

Each process feeds its share of the same batches (batch i goes to rank i % N) to eva-lora's
``compute_eva_state`` (statistics all-reduced, solves shared out) and to PEFT's
``get_eva_state_dict(gather_distributed_inputs=True)`` (activations all-gathered, every SVD on every
rank). Bytes are counted by wrapping the collectives. One JSON line per (method, processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def count_bytes(counter: list[int]) -> None:
    """Wrap all_gather / all_reduce / broadcast so every tensor sent is counted (per rank)."""
    import torch.distributed as dist

    for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            tensor = args[1] if _name in ("all_gather", "all_gather_into_tensor") else args[0]
            if isinstance(tensor, torch.Tensor):
                counter[0] += tensor.numel() * tensor.element_size()
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, queue) -> None:
    from bench_init import build_case
    from eva_lora import EvaConfig, compute_eva_state

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, args.threads // world))
    backend = "nccl" if args.device == "cuda" else "gloo"
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    torch.distributed.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    counter = [0]
    count_bytes(counter)
    model, batches, settings = build_case(args.case, device)
    batches = batches[: args.batches]
    mine = batches[rank::world]
    model(**mine[0])  # warm-up
    results = {}
    torch.distributed.barrier()
    start = time.perf_counter()
    state = compute_eva_state(
        model, iter(mine), EvaConfig(**settings, distributed_inputs="sharded")
    )
    results["eva-lora"] = (time.perf_counter() - start, counter[0], state.n_batches)
    if not args.skip_peft:
        from peft import EvaConfig as PeftEvaConfig
        from peft import LoraConfig, get_eva_state_dict

        from eva_lora.targets import find_target_layers

        cfg = LoraConfig(
            r=settings["rank"],
            target_modules=sorted(find_target_layers(model, EvaConfig(**settings))),
            eva_config=PeftEvaConfig(rho=settings["rho"], tau=settings["tau"]),
        )
        counter[0] = 0
        calls = [0]

        def forward(m, batch):
            calls[0] += 1
            return m(**batch)

        torch.distributed.barrier()
        start = time.perf_counter()
        get_eva_state_dict(
            model,
            mine,
            cfg,
            forward_fn=forward,
            show_progress_bar=False,
            gather_distributed_inputs=True,
        )
        results["peft"] = (time.perf_counter() - start, counter[0], calls[0] * world)
    queue.put((rank, results))
    torch.distributed.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=worker, args=(r, world, os.path.join(tmp, "pg"), args, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        reports = dict(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
    for method in reports[0]:
        seconds = [reports[r][method][0] for r in range(world)]
        # one process communicates nothing (PEFT still calls all_gather on itself: not counted)
        sent = [reports[r][method][1] if world > 1 else 0 for r in range(world)]
        n = reports[0][method][2]
        print(
            json.dumps(
                {
                    "case": args.case,
                    "device": args.device,
                    "method": method,
                    "processes": world,
                    "seconds_per_rank_max": round(max(seconds), 2),
                    "global_batches": n,
                    "bytes_sent_per_rank": max(sent),
                    "bytes_per_global_batch": round(max(sent) / max(n, 1)),
                    "threads_per_rank": max(1, args.threads // world),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["minilm", "llama"], default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--batches", type=int, default=160, help="batches available (shared out between ranks)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    for world in args.procs:
        run(world, args)


if __name__ == "__main__":
    main()
