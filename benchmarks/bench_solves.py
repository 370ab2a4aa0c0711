"""A convergence check's small symmetric eigenproblems: batched or one by one, on how many threads.

    python benchmarks/bench_solves.py                      # CPU: 1 thread vs all, batched vs looped
    # the same with another process keeping a core busy
    python benchmarks/bench_solves.py --busy
    # GPU: batched vs looped vs solved on the host, float64 vs float32
    python benchmarks/bench_solves.py --device cuda

A check solves one m x m problem per group (m = the Ritz block of an exact statistic, or the window
span of a sketch: 48-320 at r 16; at 8B widths every group is a sketch of 128 directions, and a
check solves per group the Gram of its window's 161 new directions and the 289-wide window: 8
groups for 2 blocks, 128 for Llama-3-8B). Each line of output is one JSON record: median
milliseconds per check for ``groups`` problems of size ``m``.

On a GPU, ``host_ms`` is the same stack copied to the CPU, solved there, and copied back.
``torch.linalg.eigh`` on CUDA solves float64 problems wider than 32 with one cuSOLVER ``syevd``
per matrix, in a loop (``linalg_eigh_cusolver`` in ATen's ``BatchLinearAlgebraLib.cpp``; float32
from 32 to 512 wide with one ``syevj`` per matrix; batched only up to 32 wide), so a stack of small
problems pays a per-matrix latency that LAPACK on the host does not. :func:`host_solves` is the
matching trial patch for whole runs (``bench_scale.py measure --device cuda`` runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time
from collections.abc import Iterator

import torch

from eva_lora.numerics import single_thread

# (m, groups), cheapest first (a step cut short by its time limit keeps them): the 8B-width
# sketches' two solves per check (2 blocks), MiniLM-like Ritz blocks, r 16 windows, 128 groups
SHAPES = ((161, 8), (289, 8), (48, 18), (160, 8), (320, 8), (161, 128), (289, 128), (320, 128))


def solve_on_host(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a stack computed on the CPU, returned to the stack's device: one
    copy each way. On one thread, as the engine solves on a CPU (:func:`single_thread`)."""
    with single_thread(torch.device("cpu")):
        values, vectors = torch.linalg.eigh(stack.cpu())
    return values.to(stack.device), vectors.to(stack.device)


@contextlib.contextmanager
def host_solves() -> Iterator[None]:
    """Trial patch, not the engine's behaviour: every check's small eigenproblems solved on the CPU.

    Swaps ``batched_eigh`` where the engine and the sketches call it for a version that stacks the
    matrices of each size on their device, copies each stack to the host once, solves it there
    (:func:`solve_on_host`) and copies the eigenpairs back once: per check and size, one copy
    each way and the synchronisation that comes with it. Measured against the engine as it is on
    a GPU (``bench_scale.py measure --device cuda``) before anything of it enters the engine.
    """
    from eva_lora import engine
    from eva_lora import statistics as sketch_module

    def on_host(matrices):
        out = [None] * len(matrices)
        buckets: dict[tuple, list[int]] = {}
        for index, matrix in enumerate(matrices):
            buckets.setdefault((tuple(matrix.shape), matrix.dtype, matrix.device), []).append(index)
        for indices in buckets.values():
            stack = torch.stack([matrices[i] for i in indices])
            stack = torch.nan_to_num(  # as batched_eigh: symmetrised, one poisoned group spares all
                0.5 * (stack + stack.transpose(-1, -2)), nan=0.0, posinf=0.0, neginf=0.0
            )
            values, vectors = solve_on_host(stack)
            for slot, index in enumerate(indices):
                out[index] = (values[slot], vectors[slot])
        return out

    saved = {module: module.batched_eigh for module in (engine, sketch_module)}
    for module in saved:
        module.batched_eigh = on_host
    try:
        yield
    finally:
        for module, solver in saved.items():
            module.batched_eigh = solver


def _spin(stop) -> None:  # another process's work on the same machine
    x = 0
    while not stop.is_set():
        x += 1


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """``count`` other processes each keep a core busy while inside (a shared machine)."""
    stop = multiprocessing.Event()
    spinners = [
        multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(count)
    ]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()


def timed(fn, device: str, repeats: int = 7) -> float:
    fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return 1000 * statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--busy", action="store_true", help="keep one core busy in another process")
    args = parser.parse_args(argv)
    busy = contextlib.ExitStack()
    busy.enter_context(busy_cores(1 if args.busy else 0))
    threads_all = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    try:
        for m, groups in SHAPES:
            for dtype in (torch.float64, torch.float32):
                x = torch.randn(groups, m, 2 * m, generator=generator, dtype=dtype)
                stack = (x @ x.transpose(1, 2)).to(args.device)
                thread_options = (1, threads_all) if args.device == "cpu" else (None,)
                for threads in thread_options:
                    if threads:
                        torch.set_num_threads(threads)
                    batched = timed(lambda stack=stack: torch.linalg.eigh(stack), args.device)
                    looped = timed(
                        lambda stack=stack: [torch.linalg.eigh(s) for s in stack], args.device
                    )
                    host = (
                        {"host_ms": round(timed(lambda s=stack: solve_on_host(s), args.device), 3)}
                        if args.device != "cpu"
                        else {}
                    )
                    print(
                        json.dumps(
                            {
                                "bench": "small_solves",
                                "device": args.device,
                                "busy_core": args.busy,
                                "m": m,
                                "groups": groups,
                                "dtype": str(dtype).split(".")[-1],
                                "threads": threads,
                                "batched_ms": round(batched, 3),
                                "looped_ms": round(looped, 3),
                                **host,
                            }
                        ),
                        flush=True,
                    )
                torch.set_num_threads(threads_all)
    finally:
        busy.close()


if __name__ == "__main__":
    main()
