"""Where eva-lora's overhead over plain forward passes goes, part by part (cProfile).

    python benchmarks/profile_init.py --case minilm     # ~1 min on 2 CPU cores
    python benchmarks/profile_init.py --case llama

Runs ``compute_eva_state`` on a ``bench_init.py`` case twice (the first run warms the allocator and
measures the wall time), then the same number of plain forward passes, then a third, profiled run.
Prints one JSON line per part: the seconds cProfile attributes to it (cumulative, so the parts of a
part are listed under it) and its share of the plain passes' time, so a claim such as "the
statistics cost x % of the forward pass" is a measurement, not arithmetic. Profiling slows Python
a little; the parts are compared with each other and with the unprofiled ratio printed first.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import build_case, timed_forwards  # noqa: E402
from eva_lora import EvaConfig, compute_eva_state  # noqa: E402

# (label, file suffix, function name): the engine's parts, cumulative time of each
PARTS = [
    ("exact statistic: rows absorbed", "eva_lora/pca.py", "update"),
    ("sketch statistic: rows absorbed", "eva_lora/statistics.py", "update"),
    (
        "  of which opening a window (new directions, power step)",
        "eva_lora/statistics.py",
        "_open_window",
    ),
    ("convergence checks (folding sketches in, solves, decisions)", "eva_lora/engine.py", "_check"),
    ("decompositions (eigh, anywhere)", "~", "<built-in method torch._C._linalg.linalg_eigh>"),
    ("model's linear layers (forward)", "~", "<built-in method torch._C._nn.linear>"),
]


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of the functions called ``name`` in files ending with ``suffix`` ("~":
    built-ins, which have no file)."""
    return sum(
        ct
        for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items()
        if func == name and (suffix == "~" or file.endswith(suffix))
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["minilm", "llama"], default="minilm")
    parser.add_argument(
        "--check-every", type=int, default=None, help="EvaConfig.check_every (default: its own)"
    )
    args = parser.parse_args(argv)
    model, batches, settings = build_case(args.case, "cpu")
    if args.check_every is not None:
        settings = {**settings, "check_every": args.check_every}
    config = EvaConfig(**settings, max_batches=1000)
    timed_forwards(model, batches[:3])
    compute_eva_state(model, batches, config, progress=False)
    start = time.perf_counter()
    state = compute_eva_state(model, batches, config, progress=False)
    seconds = time.perf_counter() - start
    plain = sum(timed_forwards(model, [batches[i % len(batches)] for i in range(state.n_batches)]))
    print(
        json.dumps(
            {
                "case": args.case,
                "check_every": config.check_every,
                "threads": torch.get_num_threads(),
                "eva_seconds": round(seconds, 2),
                "forward_passes": state.n_batches,
                "plain_seconds": round(plain, 2),
                "overhead_ratio": round(seconds / plain, 3),
            }
        ),
        flush=True,
    )
    profile = cProfile.Profile()
    profile.enable()
    compute_eva_state(model, batches, config, progress=False)
    profile.disable()
    stats = pstats.Stats(profile)
    for label, suffix, name in PARTS:
        part = cumulative(stats, suffix, name)
        print(
            json.dumps(
                {"part": label, "seconds": round(part, 3), "of_plain": round(part / plain, 3)}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
