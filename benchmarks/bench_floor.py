"""The arithmetic EVA's rows cost: a floor under the engine's overhead, measured in one process.

    python benchmarks/bench_floor.py                 # MiniLM (real weights), idle machine
    python benchmarks/bench_floor.py --busy          # another process keeps one core busy
    python benchmarks/bench_floor.py --repeats 7

The engine feeds every group the rows of every batch the pass computes for it, converged groups
too (they refine their components: not feeding them measured a whole-data mean of 0.977 against
0.9926 on MiniLM, ``benchmarks/README.md``). Whatever else an engine does, it must run the part of
each pass it needs and absorb those rows: an exact group adds ``x^T x`` (``n d^2 (b + 1) / (2 b)``
multiply-adds over the upper block triangle of ``b`` equal blocks), a sketch at least projects its
rows on its kept basis and sums their Gram (``n d s + n s^2``; the engine's sketch also explores
new directions, so this is less than it does). This script

1. runs the engine once on ``bench_init.py``'s case (its settings, its batches, cycled as the
   engine cycles them) and records, by wrapping the statistics' ``update`` and the capture's
   ``set_batch`` (the engine is not changed), the rows each group absorbed from each batch, in
   order, and the layer each pass stopped before (the early exit);
2. times, interleaved in ``--repeats`` rounds: full plain passes over the batches the run consumed
   (``bench_init.py``'s denominator); plain passes that stop where the engine's did (a pre-hook
   on the same layer); the same passes under the engine's own capture (its hooks, token mask and
   per-group gather of the kept rows; the rows then dropped); the exact groups' updates replayed
   into fresh :class:`~eva_lora.pca.CovarianceAccumulator` s (the engine's code, its block split
   and dtype);
   the same with every exact group split into two blocks (what ``block_bounds`` does from 512
   wide: a trial for narrower groups); and the sketch groups' least absorption (rows centred on
   their batch's mean, the engine centres on its window's first batch's: the same work; projected
   on an orthonormal basis of the sketch's size; the Gram added in float64, as the engine does);
   and the engine's whole run again (``bench_init.run_ours``);
3. prints one JSON line per round and a summary: each part's median share of the full plain
   passes, GFLOP/s (matrix products counted by ``torch.utils.flop_counter``; CPU attention kernels
   are not counted, ~3 % of MiniLM's forward at 64 tokens), and ``floor_ratio``: the median over
   rounds of (truncated passes + exact updates + the sketch's least absorption) / full passes;
   ``floor_ratio_with_capture`` the same with the captured passes; ``engine_ratio`` the engine's
   run over the same full passes, and ``engine_above_floor_with_capture`` what the engine spends
   beyond that floor (opening sketch windows, the sketches' exploring columns, the convergence
   checks, rank allocation), as a share of the full passes.

Everything else the engine does (opening sketch windows, the sketches' exploring columns, the
convergence checks, rank allocation, the final solve; and, in ``floor_ratio``, gathering the kept
tokens, which ``floor_ratio_with_capture`` includes) is left out, so ``bench_init.py``'s overhead
ratio for the same case is above both. The 1.15x target is out of reach for any engine that absorbs
every row when ``floor_ratio`` reaches it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
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
from bench_solves import busy_cores  # noqa: E402
from eva_lora.capture import ActivationCapture, StopForward  # noqa: E402
from eva_lora.numerics import statistics_precision  # noqa: E402
from eva_lora.pca import CovarianceAccumulator, block_bounds  # noqa: E402
from eva_lora.statistics import ExactStatistic, SketchStatistic  # noqa: E402

# (group index, rows): what one statistic absorbed from one batch, in the order it did
Record = tuple[int, torch.Tensor]


class Recorded:
    """What one engine run absorbed and computed: per-statistic rows, sketch sizes, the exact
    statistics' dtypes, and per pass the layer the pass stopped before (None: it ran to the end)."""

    def __init__(self) -> None:
        self.exact: list[Record] = []
        self.sketch: list[Record] = []
        self.sizes: dict[int, int] = {}
        self.dtypes: dict[int, torch.dtype] = {}
        self.exits: list[str | None] = []


@contextlib.contextmanager
def recording(into: Recorded) -> Iterator[None]:
    """Wrap both statistics' ``update`` (each call's rows are copied, keyed by the statistic's
    first-seen order, before the engine's own update runs) and the capture's ``set_batch`` (the
    exit point in force for each counted pass)."""
    ids: dict[int, int] = {}

    def wrap(original: Callable, rows_into: list[Record]) -> Callable:
        @functools.wraps(original)
        def update(self: Any, rows: torch.Tensor) -> None:
            key = ids.setdefault(id(self), len(ids))
            if isinstance(self, SketchStatistic):
                into.sizes[key] = self.size
            else:
                into.dtypes[key] = self.acc.moment.dtype
            rows_into.append((key, rows.detach().clone()))
            original(self, rows)

        return update

    original_set_batch = ActivationCapture.set_batch

    @functools.wraps(original_set_batch)
    def set_batch(self: ActivationCapture, batch: Any, host_batch: Any = None, count=False):
        if count:  # the engine's counted passes (the probe pass is not one)
            into.exits.append(self.exit_layer)
        return original_set_batch(self, batch, host_batch, count)

    with (
        mock.patch.object(ExactStatistic, "update", wrap(ExactStatistic.update, into.exact)),
        mock.patch.object(SketchStatistic, "update", wrap(SketchStatistic.update, into.sketch)),
        mock.patch.object(ActivationCapture, "set_batch", set_batch),
    ):
        yield


def split(dim: int, blocks: int | None) -> list[tuple[int, int]]:
    """Column blocks: the engine's (``block_bounds``) for None, else ``blocks`` equal ones."""
    if blocks is None:
        return block_bounds(dim)
    edges = [round(i * dim / blocks) for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def replay_exact(
    records: list[Record], blocks: int | None, dtypes: dict[int, torch.dtype] | None = None
) -> tuple[float, dict[int, CovarianceAccumulator]]:
    """Seconds to absorb ``records`` into fresh accumulators (of ``dtypes[key]``, float32 when not
    given), and the accumulators; column blocks as :func:`split`."""
    accumulators: dict[int, CovarianceAccumulator] = {}
    for key, rows in records:
        if key not in accumulators:
            dtype = (dtypes or {}).get(key, torch.float32)
            acc = CovarianceAccumulator(rows.shape[1], dtype=dtype)
            acc.blocks = split(acc.dim, blocks)
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


def exact_flops(records: list[Record], blocks: int | None) -> float:
    """2 x the multiply-adds of the upper block triangle of ``x^T x`` (blocks as :func:`split`)."""
    total = 0.0
    for _, rows in records:
        n, d = rows.shape
        widths = [b - a for a, b in split(d, blocks)]
        total += sum(2 * n * w * v for i, w in enumerate(widths) for v in widths[i:])
    return total


def sketch_flops(records: list[Record], sizes: dict[int, int]) -> float:
    """2 x the multiply-adds of :func:`replay_sketch_floor`'s two products."""
    return sum(2 * r.shape[0] * sizes[k] * (r.shape[1] + sizes[k]) for k, r in records)


def _stop(module: torch.nn.Module, args: tuple) -> None:
    raise StopForward  # the engine's own signal, raised before the layer as its hook does


def truncated_forwards(
    model: torch.nn.Module, batches: list[dict], exits: list[str | None]
) -> list[float]:
    """Seconds of plain passes that stop before the layer each engine pass stopped before (the
    engine's hooks run before their layer, and the deepest active group's raises)."""
    out = []
    with torch.no_grad():
        for batch, exit_layer in zip(batches, exits, strict=True):
            handle = None
            if exit_layer is not None:
                handle = model.get_submodule(exit_layer).register_forward_pre_hook(_stop)
            start = time.perf_counter()
            try:
                model(**batch)
            except StopForward:
                pass
            out.append(time.perf_counter() - start)
            if handle is not None:
                handle.remove()
    return out


def captured_forwards(
    model: torch.nn.Module, batches: list[dict], exits: list[str | None], settings: dict
) -> list[float]:
    """Seconds of passes under the engine's own capture (its hooks, token mask and per-group
    gather of the kept rows, its early exit where the engine's passes stopped), the rows then
    dropped: what feeding costs before any statistic sees a row."""
    from eva_lora import EvaConfig
    from eva_lora.capture import probe_slice
    from eva_lora.targets import find_target_layers

    config = EvaConfig(**settings)
    capture = ActivationCapture(
        find_target_layers(model, config), config.use_label_mask, config.label_mask_value
    )
    out = []
    with torch.no_grad(), capture:
        probe = probe_slice(batches[0])
        capture.set_batch(probe)
        model(**probe)
        capture.finish_probe()
        order = {name: i for i, g in enumerate(capture.groups) for name in g.names}
        for group in capture.groups:
            group.sink = _drop
        for batch, exit_layer in zip(batches, exits, strict=True):
            last = len(capture.groups) if exit_layer is None else order[exit_layer]
            for i, group in enumerate(capture.groups):  # the engine feeds all groups up to its exit
                group.active = i <= last
            capture.set_exit_point(exit_layer is not None)
            if capture.exit_layer != exit_layer:
                raise RuntimeError(
                    f"capture exits at {capture.exit_layer}, the engine at {exit_layer}"
                )
            start = time.perf_counter()
            capture.set_batch(batch, count=True)
            try:
                model(**batch)
            except StopForward:
                pass
            out.append(time.perf_counter() - start)
    return out


def _drop(rows: torch.Tensor) -> None:
    """A sink that keeps nothing."""


def forward_flops(model: torch.nn.Module, batches: list[dict], exits: list[str | None]) -> float:
    with FlopCounterMode(display=False) as counter:
        truncated_forwards(model, batches, exits)
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
    with busy_cores(1 if args.busy else 0):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    def emit(**fields: Any) -> None:
        print(json.dumps({"case": args.case, "busy": args.busy, **fields}), flush=True)

    model, batches, settings = build_case(args.case, "cpu")
    timed_forwards(model, batches[:3])  # warm-up
    run = Recorded()
    with recording(run):
        _, passes, _, _ = run_ours(model, batches, settings)
    if len(run.exits) != passes:
        raise RuntimeError(f"recorded {len(run.exits)} passes, the engine reports {passes}")
    consumed = [batches[i % len(batches)] for i in range(passes)]  # the engine cycles batches
    full = [None] * passes
    flops = {
        "forward": forward_flops(model, consumed, full),
        "truncated": forward_flops(model, consumed, run.exits),
        "exact": exact_flops(run.exact, None),
        "exact_2_blocks": exact_flops(run.exact, 2),
        "sketch_floor": sketch_flops(run.sketch, run.sizes),
    }
    emit(
        event="setup",
        threads=torch.get_num_threads(),
        forward_passes=passes,
        passes_cut_short=sum(e is not None for e in run.exits),
        exact_groups=len(run.dtypes),
        exact_updates=len(run.exact),
        sketch_groups=len(run.sizes),
        sketch_updates=len(run.sketch),
        sketch_sizes=sorted(set(run.sizes.values())),
        rows_per_update=round(statistics.mean(r.shape[0] for _, r in run.exact + run.sketch), 1),
        gflop={k: round(v / 1e9, 2) for k, v in flops.items()},
    )
    rounds: list[dict[str, float]] = []
    for repeat in range(args.repeats):
        seconds = {
            "forward": sum(truncated_forwards(model, consumed, full)),
            "truncated": sum(truncated_forwards(model, consumed, run.exits)),
            "captured": sum(captured_forwards(model, consumed, run.exits, settings)),
            "exact": replay_exact(run.exact, None, run.dtypes)[0],
            "exact_2_blocks": replay_exact(run.exact, 2, run.dtypes)[0],
            "sketch_floor": replay_sketch_floor(run.sketch, run.sizes),
            "engine": run_ours(model, batches, settings)[0],
        }
        rounds.append(seconds)
        emit(event="round", repeat=repeat, seconds={k: round(v, 3) for k, v in seconds.items()})
    emit(event="summary", **summarise(rounds, flops))


def summarise(rounds: list[dict[str, float]], flops: dict[str, float]) -> dict[str, Any]:
    """Median share of the full plain passes per part (each round against its own passes), the
    GFLOP/s of each part, and the ratios: per round a sum of parts over the full passes, then the
    median over rounds (a median of per-round sums, not a sum of medians)."""
    median = statistics.median
    shares = {
        part: median(r[part] / r["forward"] for r in rounds)
        for part in rounds[0]
        if part != "forward"
    }
    rates = {part: flops[part] / median(r[part] for r in rounds) / 1e9 for part in flops}

    def ratio(*parts: str) -> float:
        return round(median(sum(r[p] for p in parts) / r["forward"] for r in rounds), 3)

    out = {
        "share_of_plain_passes": {k: round(v, 4) for k, v in shares.items()},
        "gflop_per_s": {k: round(v, 1) for k, v in rates.items()},
        "floor_ratio": ratio("truncated", "exact", "sketch_floor"),
        "floor_ratio_exact_2_blocks": ratio("truncated", "exact_2_blocks", "sketch_floor"),
    }
    if "captured" in rounds[0] and "engine" in rounds[0]:
        out["floor_ratio_with_capture"] = ratio("captured", "exact", "sketch_floor")
        out["engine_ratio"] = ratio("engine")
        rest = [r["engine"] - r["captured"] - r["exact"] - r["sketch_floor"] for r in rounds]
        out["engine_above_floor_with_capture"] = round(
            median(x / r["forward"] for x, r in zip(rest, rounds)), 3
        )
    return out


if __name__ == "__main__":
    main()
