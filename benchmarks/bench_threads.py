"""Per-batch statistics on one thread or on all: a trial, in one process, on MiniLM (real weights).

    python benchmarks/bench_threads.py                 # idle machine, 4 pairs of runs
    python benchmarks/bench_threads.py --busy          # another process keeps one core busy
    python benchmarks/bench_threads.py --busy 2        # both cores (2 CPU cores here) kept busy

The engine runs its checks' small solves on one thread (``eva_lora.numerics.single_thread``) but
absorbs each batch's rows with all of torch's threads. On a CPU shared with other work, the many
small per-batch operations of the statistics (casting and centring ~400 rows, column sums, thin
products) wait at every thread barrier for a core that another process holds. This script swaps
the context the engine absorbs rows under (``engine.statistics_precision``) for one that also pins
one thread (a trial patch, not the engine's behaviour) and times, alternating, the engine as it is
and the trial, each followed by plain passes over the same batches. Each line of output is one
JSON record; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import build_case, run_ours, timed_forwards  # noqa: E402
from bench_solves import busy_cores  # noqa: E402
from eva_lora import engine  # noqa: E402
from eva_lora.numerics import single_thread, statistics_precision  # noqa: E402


@contextlib.contextmanager
def one_thread_statistics(allow_tf32: bool = False) -> Iterator[None]:
    """What the engine absorbs rows under, plus one intra-op thread."""
    with statistics_precision(allow_tf32), single_thread(torch.device("cpu")):
        yield


def timed_run(model, batches, settings, trial: bool) -> tuple[float, int]:
    """bench_init's timed EVA run, under the trial's context when ``trial``."""
    patch = (
        mock.patch.object(engine, "statistics_precision", one_thread_statistics)
        if trial
        else contextlib.nullcontext()
    )
    with patch:
        seconds, passes, _, _ = run_ours(model, batches, settings)
    return seconds, passes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--busy",
        type=int,
        nargs="?",
        const=1,
        default=0,
        help="keep this many cores busy in other processes (--busy alone: 1)",
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    with busy_cores(args.busy):
        model, batches, settings = build_case("minilm", "cpu")
        timed_forwards(model, batches[:3])  # warm-up
        for repeat in range(args.repeats):
            for trial in (False, True):
                seconds, passes = timed_run(model, batches, settings, trial)
                plain = sum(timed_forwards(model, batches[:passes]))
                print(
                    json.dumps(
                        {
                            "repeat": repeat,
                            "busy_cores": args.busy,
                            "statistics_threads": 1 if trial else torch.get_num_threads(),
                            "seconds": round(seconds, 2),
                            "forward_passes": passes,
                            "plain_forward_seconds": round(plain, 2),
                            "overhead_ratio": round(seconds / plain, 3),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
