"""Where eva-lora's overhead over plain forward passes goes, part by part (``torch.profiler``).

    python benchmarks/profile_init.py --case minilm                   # ~1 min on 2 CPU cores
    python benchmarks/profile_init.py --case llama --device cuda      # kernel time on a GPU

Runs ``compute_eva_state`` on a ``bench_init.py`` case twice (the first run warms the allocator and
the second measures the wall time), then the same number of plain forward passes, then a third run
under ``torch.profiler``, with the engine's parts marked by ``record_function`` ranges (the
functions are wrapped here; the library is not changed). Prints one JSON line per part: its host
time and, on a GPU, the device time of the kernels it launched (both inclusive: a part's sub-parts
are listed under it), each as a share of the plain passes' wall time. So "the statistics cost x %
of the forward pass" is a measurement, not arithmetic. The profiler slows every operator a little;
compare the parts with each other and with the unprofiled ratio printed first.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import build_case, timed_forwards  # noqa: E402
from eva_lora import EvaConfig, compute_eva_state  # noqa: E402
from eva_lora.engine import _EvaLoop  # noqa: E402
from eva_lora.pca import CovarianceAccumulator  # noqa: E402
from eva_lora.statistics import SketchStatistic  # noqa: E402

# (label, class, method): the engine's parts, each marked with a record_function range
MARKED = [
    ("exact statistic: rows absorbed", CovarianceAccumulator, "update"),
    ("sketch statistic: rows absorbed", SketchStatistic, "update"),
    ("  of which opening a window (random range, power step)", SketchStatistic, "_open_window"),
    ("convergence checks (sketches folded in, solves, decisions)", _EvaLoop, "_check"),
]
# (label, operator): built-in operators, wherever they are called
OPERATORS = [
    ("decompositions (eigh, anywhere)", "aten::linalg_eigh"),
    ("linear layers (the model's and any other)", "aten::linear"),
]


def mark(owner: type, method: str, label: str) -> None:
    """Wrap ``owner.method`` in a ``record_function(label)`` range."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def marked(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, method, marked)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["minilm", "llama"], default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--check-every", type=int, default=None, help="EvaConfig.check_every (default: its own)"
    )
    args = parser.parse_args(argv)
    model, batches, settings = build_case(args.case, args.device)
    if args.check_every is not None:
        settings = {**settings, "check_every": args.check_every}
    config = EvaConfig(**settings, max_batches=1000)
    timed_forwards(model, batches[:3])
    compute_eva_state(model, batches, config, progress=False)
    start = time.perf_counter()
    state = compute_eva_state(model, batches, config, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    plain = sum(timed_forwards(model, [batches[i % len(batches)] for i in range(state.n_batches)]))
    emit(
        case=args.case,
        device=args.device,
        check_every=config.check_every,
        threads=torch.get_num_threads(),
        eva_seconds=round(seconds, 2),
        forward_passes=state.n_batches,
        plain_seconds=round(plain, 2),
        overhead_ratio=round(seconds / plain, 3),
    )
    for label, owner, method in MARKED:
        mark(owner, method, label)
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        compute_eva_state(model, batches, config, progress=False)
    totals = {event.key: event for event in prof.key_averages()}
    for label, key in [(label, label) for label, _, _ in MARKED] + OPERATORS:
        event = totals.get(key)
        host = event.cpu_time_total / 1e6 if event else 0.0
        device = event.device_time_total / 1e6 if event else 0.0
        row = {
            "part": label,
            "host_seconds": round(host, 3),
            "host_of_plain": round(host / plain, 3),
        }
        if len(activities) > 1:
            row.update(device_seconds=round(device, 3), device_of_plain=round(device / plain, 3))
        emit(**row)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    main()
