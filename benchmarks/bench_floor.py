"""The arithmetic EVA's rows cost: a floor under the engine's overhead, measured in one process.

    python benchmarks/bench_floor.py                 # MiniLM (real weights), idle machine
    python benchmarks/bench_floor.py --busy          # another process keeps one core busy
    python benchmarks/bench_floor.py --repeats 7

The engine feeds every group the rows of every batch the pass computes for it, converged groups
too (they refine their components: not feeding them measured a whole-data mean of 0.977 against
0.9926 on MiniLM, ``benchmarks/README.md``). Whatever else an engine does, it must at least absorb
those rows: an exact group adds ``x^T x`` (``n d^2`` multiply-adds, or ``n d (d + b) / 2`` over the
upper block triangle of ``b`` blocks), a sketch at least projects its rows on its kept basis and
sums their Gram (``n d s + n s^2``; the engine's sketch also explores, so this is less than it
does). This script

1. runs the engine once on ``bench_init.py``'s case (its settings, its batches) and records, by
   wrapping the statistics' ``update`` (the engine is not changed), the exact rows each group
   absorbed from each batch, in order;
2. times, interleaved in ``--repeats`` rounds: plain forward passes over the batches the run
   consumed; the exact groups' updates replayed into fresh
   :class:`~eva_lora.pca.CovarianceAccumulator` s (the engine's code, its block split); the same
   with every exact group split into two blocks (what ``block_bounds`` does from 512 wide: a trial
   for narrower groups); and the sketch groups' minimal absorption (rows centred, projected on an
   orthonormal basis of the sketch's size, their Gram summed in float64, as the engine does);
3. prints one JSON line per round and a summary: each part's median share of the plain passes,
   its GFLOP/s next to the forward pass's (``torch.utils.flop_counter``), and the floor, the sum of
   the parts an engine that absorbs every row cannot avoid.

The floor leaves out everything else the engine does (gathering the kept tokens, opening sketch
windows, the convergence checks, rank allocation), so the engine's overhead is above
``1 + floor``. Compare it with ``bench_init.py``'s ratio (the target is 1.15x).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import build_case, run_ours, timed_forwards  # noqa: E402
from bench_solves import _spin  # noqa: E402
from eva_lora.numerics import statistics_precision  # noqa: E402
from eva_lora.pca import CovarianceAccumulator  # noqa: E402
from eva_lora.statistics import ExactStatistic, SketchStatistic  # noqa: E402

# (group index, rows): what one statistic absorbed from one batch, in the order it did
Record = tuple[int, torch.Tensor]


@contextlib.contextmanager
def recording(exact: list[Record], sketch: list[Record], sizes: dict[int, int]) -> Iterator[None]:
    """Wrap both statistics' ``update``: each call's rows are copied into ``exact`` / ``sketch``
    (keyed by the statistic's first-seen order) before the engine's own update runs."""
    ids: dict[int, int] = {}

    def wrap(original: Callable, into: list[Record]) -> Callable:
        @functools.wraps(original)
        def update(self: Any, rows: torch.Tensor) -> None:
            key = ids.setdefault(id(self), len(ids))
            if isinstance(self, SketchStatistic):
                sizes[key] = self.size
            into.append((key, rows.detach().clone()))
            original(self, rows)

        return update

    with (
        mock.patch.object(ExactStatistic, "update", wrap(ExactStatistic.update, exact)),
        mock.patch.object(SketchStatistic, "update", wrap(SketchStatistic.update, sketch)),
    ):
        yield


def replay_exact(
    records: list[Record], blocks: int | None
) -> tuple[float, dict[int, CovarianceAccumulator]]:
    """Seconds to absorb ``records`` into fresh accumulators, and the accumulators (``blocks``:
    None keeps the engine's split, else that many equal column blocks)."""
    accumulators: dict[int, CovarianceAccumulator] = {}
    for key, rows in records:
        if key not in accumulators:
            acc = CovarianceAccumulator(rows.shape[1])
            if blocks is not None:
                edges = [round(i * acc.dim / blocks) for i in range(blocks + 1)]
                acc.blocks = list(zip(edges[:-1], edges[1:]))
            accumulators[key] = acc
    start = time.perf_counter()
    with statistics_precision():
        for key, rows in records:
            accumulators[key].update(rows)
    return time.perf_counter() - start, accumulators


def replay_sketch_floor(records: list[Record], sizes: dict[int, int]) -> float:
    """Seconds for the least a sketch does with its rows: centre them, project them on a kept
    basis of its size, add their Gram in float64 (the engine's precision)."""
    generator = torch.Generator().manual_seed(0)
    bases, grams = {}, {}
    for key, rows in records:
        if key not in bases:
            q, _ = torch.linalg.qr(torch.randn(rows.shape[1], sizes[key], generator=generator))
            bases[key] = q.contiguous()
            grams[key] = torch.zeros(sizes[key], sizes[key], dtype=torch.float64)
    start = time.perf_counter()
    with statistics_precision():
        for key, rows in records:
            x = rows.to(torch.float32, copy=True)
            x -= x.mean(0)
            w = x @ bases[key]
            grams[key] += (w.T @ w).to(torch.float64)
    return time.perf_counter() - start


def exact_flops(records: list[Record], blocks: int) -> float:
    """Multiply-adds x 2 of the upper block triangle of ``x^T x`` over ``blocks`` equal blocks."""
    total = 0.0
    for _, rows in records:
        n, d = rows.shape
        total += 2 * n * d * d * (blocks + 1) / (2 * blocks)
    return total


def sketch_flops(records: list[Record], sizes: dict[int, int]) -> float:
    return sum(2 * r.shape[0] * sizes[k] * (r.shape[1] + sizes[k]) for k, r in records)


def forward_flops(model: torch.nn.Module, batches: list[dict]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for batch in batches:
            model(**batch)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["minilm", "llama"], default="minilm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--busy", action="store_true", help="another process keeps one core busy throughout"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    warnings.simplefilter("ignore")
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    if args.busy:
        spinner.start()
    try:
        measure(args)
    finally:
        stop.set()
        if args.busy:
            spinner.join()


def measure(args: argparse.Namespace) -> None:
    def emit(**fields: Any) -> None:
        print(json.dumps({"case": args.case, "busy": args.busy, **fields}), flush=True)

    model, batches, settings = build_case(args.case, "cpu")
    timed_forwards(model, batches[:3])  # warm-up
    exact: list[Record] = []
    sketch: list[Record] = []
    sizes: dict[int, int] = {}
    with recording(exact, sketch, sizes):
        engine_seconds, passes, _, _ = run_ours(model, batches, settings)
    consumed = batches[:passes]
    engine_blocks = len(CovarianceAccumulator(exact[0][1].shape[1]).blocks) if exact else 1
    flops = {
        "forward": forward_flops(model, consumed),
        "exact": exact_flops(exact, engine_blocks),
        "exact_2_blocks": exact_flops(exact, 2),
        "sketch_floor": sketch_flops(sketch, sizes),
    }
    emit(
        event="setup",
        threads=torch.get_num_threads(),
        forward_passes=passes,
        engine_seconds=round(engine_seconds, 2),
        exact_groups=len({k for k, _ in exact}),
        exact_updates=len(exact),
        sketch_groups=len(sizes),
        sketch_updates=len(sketch),
        sketch_sizes=sorted(set(sizes.values())),
        rows_per_update=round(statistics.mean(r.shape[0] for _, r in exact + sketch), 1),
        gflop={k: round(v / 1e9, 2) for k, v in flops.items()},
    )
    rounds: list[dict[str, float]] = []
    for repeat in range(args.repeats):
        seconds = {
            "forward": sum(timed_forwards(model, consumed)),
            "exact": replay_exact(exact, None)[0],
            "exact_2_blocks": replay_exact(exact, 2)[0],
            "sketch_floor": replay_sketch_floor(sketch, sizes),
        }
        rounds.append(seconds)
        emit(event="round", repeat=repeat, seconds={k: round(v, 3) for k, v in seconds.items()})
    emit(event="summary", **summarise(rounds, flops))


def summarise(rounds: list[dict[str, float]], flops: dict[str, float]) -> dict[str, Any]:
    """Median share of the plain passes per part (each round's parts against its own passes), the
    GFLOP/s each part ran at, and the floor: engine's exact update + the sketch's minimum."""
    share = {
        part: statistics.median(r[part] / r["forward"] for r in rounds)
        for part in rounds[0]
        if part != "forward"
    }
    rate = {
        part: round(flops[part] / statistics.median(r[part] for r in rounds) / 1e9, 1)
        for part in rounds[0]
    }
    return {
        "share_of_plain_passes": {k: round(v, 4) for k, v in share.items()},
        "gflop_per_s": rate,
        "floor_ratio": round(1 + share["exact"] + share["sketch_floor"], 3),
        "floor_ratio_exact_2_blocks": round(1 + share["exact_2_blocks"] + share["sketch_floor"], 3),
    }


if __name__ == "__main__":
    main()
