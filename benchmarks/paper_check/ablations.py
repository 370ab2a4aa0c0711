"""Paper Table 7 analogue: EVA against its ablations EVA-whiten, EVA-perm, EVA-rot and LoRA-redist.

    # 5 inits x 3 seeds x 120 steps (~12 min, 2 cores)
    python benchmarks/paper_check/ablations.py
    python benchmarks/paper_check/ablations.py --quick    # eva, eva-perm: 1 seed, 8 steps (CI)

all-MiniLM-L6-v2 on the 1000 bundled SST-2 sentences, evaluated on the 300 bundled test sentences;
batch 16, lr 1e-3, r 8, rho 2, alpha 1. Each run is `eva compare`'s (the recipe of `eva train`).
"""

from __future__ import annotations

import tempfile
import time

from common import QUICK_EVA_BATCHES, claim_args, code_files, write_results

from eva_lora.app.recipes.compare import run_compare
from eva_lora.app.run_config import build_run_config

INITS = ["eva", "eva-whiten", "eva-perm", "eva-rot", "lora-redist"]
# the bundled SST-2 test set; its first 64 in --quick
TEST_SENTENCES, QUICK_TEST_SENTENCES = 300, 64


def test_size(quick: bool) -> int:
    """How many test sentences each accuracy counts: the verdict's item count."""
    return QUICK_TEST_SENTENCES if quick else TEST_SENTENCES


def main(argv: list[str] | None = None) -> None:
    args = claim_args(__doc__, argv)
    started = time.perf_counter()
    inits, seeds, steps = (["eva", "eva-perm"], [0], 8) if args.quick else (INITS, [0, 1, 2], 120)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_run_config(
            overrides={
                "model": "minilm",
                "task": "sst2",
                "rank": 8,
                "max_steps": steps,
                "batch_size": 16,
                "learning_rate": 1e-3,
                "warmup_ratio": 0.06,
                "max_length": 64,
                "logging_steps": 5,
                "output_dir": tmp,
                "eval_limit": QUICK_TEST_SENTENCES if args.quick else None,
                "progress": False,
                "eva": {"rho": 2.0, **({"max_batches": QUICK_EVA_BATCHES} if args.quick else {})},
            }
        )
        result = run_compare(cfg, inits, seeds)
    from eva_lora.app.recipes.compare import headline

    per_seed = {
        init: [headline(run, "sst2")[1] for run in runs] for init, runs in result["runs"].items()
    }
    record = {
        "quick": args.quick,
        "steps": steps,
        "seeds": seeds,
        "summary": result["summary"],
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # every run was made by this process (nothing is read back)
    write_results(args.out, "ablations", record, markdown(record), code_used=code_files())


def markdown(record: dict) -> str:
    lines = [
        "## Table 7 analogue: EVA against its ablations",
        "",
        f"`python benchmarks/paper_check/ablations.py{' --quick' if record['quick'] else ''}` "
        f"({record['seconds']} s). all-MiniLM-L6-v2, SST-2 (1000 train / 300 test sentences), "
        f"{record['steps']} steps, batch 16, lr 1e-3, r 8, rho 2, alpha 1, seeds "
        f"{record['seeds']}.",
        "",
        "| init | accuracy (mean +/- std) | train loss (mean +/- std) |",
        "|---|---|---|",
    ]
    for row in record["summary"]:
        lines.append(
            f"| {row['init']} | {100 * row['mean']:.2f} +/- {100 * row['std']:.2f} | "
            f"{row['train_loss_mean']:.4f} +/- {row['train_loss_std']:.4f} |"
        )
    best = max(record["summary"], key=lambda r: r["mean"])
    eva = next(r for r in record["summary"] if r["init"] == "eva")
    lines += [
        "",
        f"Reading: highest mean accuracy: {best['init']} ({100 * best['mean']:.2f}); "
        f"EVA {100 * eva['mean']:.2f}. Differences smaller than the std over seeds are not "
        "evidence.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
