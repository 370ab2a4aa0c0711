"""Paper Figure 2 analogue: loss and gradient norm over the first steps for EVA, LoRA, PiSSA, OLoRA.

    # 4 inits x 3 seeds x 60 steps (~6 min, 2 cores)
    python benchmarks/paper_check/early_training.py
    python benchmarks/paper_check/early_training.py --quick    # eva and lora, 1 seed, 8 steps (CI)

all-MiniLM-L6-v2 fine-tuned on the 1000 bundled SST-2 sentences (batch 16, lr 1e-3, r 8, alpha 1, no
warm-up so the first steps show the initialisation), through the same `train` recipe as `eva train`.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from common import QUICK_EVA_BATCHES, claim_args, code_files, pyplot, save_png, write_results

from eva_lora.app.recipes.train import train
from eva_lora.app.run_config import build_run_config


def curves(
    inits: list[str], seeds: list[int], steps: int, eva_batches: int | None = None
) -> dict[str, dict[str, list[float]]]:
    """init -> {"loss": mean over seeds per step, "grad_norm": ..., "init_seconds": ...,
    "per_seed": {"loss": [[...] per seed], "grad_norm": [[...] per seed]}}. ``eva_batches`` stops
    EVA after that many batches, converged or not (--quick)."""
    base = build_run_config(
        overrides={
            "model": "minilm",
            "task": "sst2",
            "rank": 8,
            "max_steps": steps,
            "batch_size": 16,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "max_length": 64,
            "logging_steps": 1,
            "progress": False,
            **({"eva": {"max_batches": eva_batches}} if eva_batches is not None else {}),
        }
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for init in inits:
            runs = [
                train(
                    dataclasses.replace(
                        base, init=init, seed=seed, output_dir=f"{tmp}/{init}{seed}"
                    ),
                    evaluate=False,
                )
                for seed in seeds
            ]
            out[init] = {
                key: [
                    round(statistics.fmean(r["log"][i][key] for r in runs), 5) for i in range(steps)
                ]
                for key in ("loss", "grad_norm")
            }
            out[init]["per_seed"] = {
                key: [[round(e[key], 5) for e in r["log"][:steps]] for r in runs]
                for key in ("loss", "grad_norm")
            }
            out[init]["init_seconds"] = round(statistics.fmean(r["init_seconds"] for r in runs), 2)
    return out


def plot(found: dict, path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for init, c in found.items():
        steps = range(1, len(c["loss"]) + 1)
        left.plot(steps, c["loss"], label=init)
        right.plot(steps, c["grad_norm"], label=init)
    left.set(xlabel="step", ylabel="training loss", title="loss (mean over seeds)")
    right.set(xlabel="step", ylabel="gradient norm", title="gradient norm (mean over seeds)")
    left.legend()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = claim_args(__doc__, argv)
    started = time.perf_counter()
    full = (["eva", "lora", "pissa", "olora"], [0, 1, 2], 60)
    inits, seeds, steps = (["eva", "lora"], [0], 8) if args.quick else full
    found = curves(inits, seeds, steps, QUICK_EVA_BATCHES if args.quick else None)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(found, args.out / "early_training.png")
    record = {
        "quick": args.quick,
        "seeds": seeds,
        "steps": steps,
        "curves": found,
        "seconds": round(time.perf_counter() - started, 1),
    }
    # every run was made by this process (nothing is read back)
    write_results(args.out, "early_training", record, markdown(record), code_used=code_files())


def _window(values: list[float], a: int, b: int) -> float:
    part = values[a:b]
    return statistics.fmean(part) if part else float("nan")


def markdown(record: dict) -> str:
    steps = record["steps"]
    windows = (
        [(0, 5), (5, 20), (20, steps)] if steps > 20 else [(0, steps // 2), (steps // 2, steps)]
    )
    head = " | ".join(f"loss {a + 1}-{b}" for a, b in windows)
    lines = [
        "## Figure 2 analogue: the first training steps",
        "",
        f"`python benchmarks/paper_check/early_training.py{' --quick' if record['quick'] else ''}` "
        f"({record['seconds']} s). all-MiniLM-L6-v2 on SST-2 (1000 sentences), batch 16, lr 1e-3, "
        f"r 8, alpha 1, no warm-up, seeds {record['seeds']}; means over seeds.",
        "",
        f"| init | init s | {head} | grad norm 1-5 | grad norm "
        f"{windows[-1][0] + 1}-{windows[-1][1]} |",
        "|---" * (len(windows) + 4) + "|",
    ]
    for init, c in record["curves"].items():
        losses = " | ".join(f"{_window(c['loss'], a, b):.4f}" for a, b in windows)
        lines.append(
            f"| {init} | {c['init_seconds']} | {losses} | {_window(c['grad_norm'], 0, 5):.3f} | "
            f"{_window(c['grad_norm'], *windows[-1]):.3f} |"
        )
    last = windows[-1]
    ranking = sorted(record["curves"], key=lambda i: _window(record["curves"][i]["loss"], *last))
    lines += [
        "",
        f"Reading: mean loss over steps {last[0] + 1}-{last[1]}, lowest first: "
        f"{', '.join(ranking)}. "
        "The gradient norm includes the classification head, which every method trains in full, "
        "so it mostly reflects the head.",
        "",
        "![early training](results/early_training.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
