"""Two versions of the engine in one process, alternated: is a change faster, and by how much?

    python benchmarks/bench_engines.py --against 99bb933              # ~4 min on 2 CPU cores
    python benchmarks/bench_engines.py --against 99bb933 --busy       # one core kept busy

On a shared machine the plain forward passes alone move by 30 % between minutes, so two versions
timed in two processes (or two sittings) cannot be told apart when they differ by less. Here the
package as it was at ``--against`` (read with ``git archive``, imported under another name: its
imports are relative) runs beside the checkout's, on the same model, batches and settings
(``bench_init.py``'s MiniLM case), after one untimed run of each, in alternating order round by
round, each round followed by the plain passes over the batches the current engine consumed.
Prints one JSON line per round and a summary: the medians of the per-round ratios current /
against, current / plain and against / plain.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import build_case, timed_forwards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def engine_at(revision: str, folder: Path) -> ModuleType:
    """The ``eva_lora`` package as it was at ``revision``, imported as ``eva_lora_<sha>``."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "src/eva_lora"],
        capture_output=True,
        check=True,
    ).stdout
    name = f"eva_lora_{sha}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "src" / "eva_lora").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", required=True, help="a git revision of this repository")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--busy", action="store_true", help="another process keeps a core busy")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    warnings.simplefilter("ignore")
    import eva_lora
    from bench_solves import busy_cores

    with tempfile.TemporaryDirectory() as folder:
        other = engine_at(args.against, Path(folder))
        model, batches, settings = build_case("minilm", "cpu")
        timed_forwards(model, batches[:3])  # warm-up
        engines = [("current", eva_lora), ("against", other)]
        rounds = []
        with busy_cores(1 if args.busy else 0):
            for _, package in engines:  # untimed: a process's first run pays for warming up
                config = package.EvaConfig(**settings, max_batches=1000)
                package.compute_eva_state(model, batches, config, progress=False)
            for index in range(args.rounds):
                row: dict[str, float] = {}
                for name, package in engines if index % 2 == 0 else engines[::-1]:
                    config = package.EvaConfig(**settings, max_batches=1000)
                    start = time.perf_counter()
                    state = package.compute_eva_state(model, batches, config, progress=False)
                    row[name] = time.perf_counter() - start
                    row[f"{name}_passes"] = state.n_batches
                passes = int(row["current_passes"])
                with torch.no_grad():
                    cycled = [batches[i % len(batches)] for i in range(passes)]
                    row["plain"] = sum(timed_forwards(model, cycled))
                rounds.append(row)
                print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)

    def median(ratio) -> float:
        return round(statistics.median(ratio(r) for r in rounds), 3)

    print(
        json.dumps(
            {
                "against": args.against,
                "busy": args.busy,
                "rounds": len(rounds),
                "current/against": median(lambda r: r["current"] / r["against"]),
                "current/plain": median(lambda r: r["current"] / r["plain"]),
                "against/plain": median(lambda r: r["against"] / r["plain"]),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
