"""A convergence check's small symmetric eigenproblems: batched or one by one, on how many threads.

    python benchmarks/bench_solves.py                      # CPU: 1 thread vs all, batched vs looped
    # the same with another process keeping a core busy
    python benchmarks/bench_solves.py --busy
    # GPU: batched vs looped, float64 vs float32
    python benchmarks/bench_solves.py --device cuda

A check solves one m x m problem per group (m = the Ritz block of an exact statistic, or the window
span of a sketch: 48-320 at r 16). Each line of output is one JSON record: median milliseconds per
check for ``groups`` problems of size ``m``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import torch


def _spin(stop) -> None:  # another process's work on the same machine
    x = 0
    while not stop.is_set():
        x += 1


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
    stop = multiprocessing.Event()
    spinner = (
        multiprocessing.Process(target=_spin, args=(stop,), daemon=True) if args.busy else None
    )
    if spinner:
        spinner.start()
    threads_all = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    try:
        for m, groups in ((48, 18), (160, 8), (320, 8), (320, 128)):
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
                            }
                        ),
                        flush=True,
                    )
                torch.set_num_threads(threads_all)
    finally:
        stop.set()
        if spinner:
            spinner.join()


if __name__ == "__main__":
    main()
