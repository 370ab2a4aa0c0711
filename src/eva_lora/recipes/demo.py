"""The main job on an embedded default: EVA vs random LoRA on the real all-MiniLM-L6-v2 and SST-2.

    eva demo             # ~2.5 min on 2 CPU cores
    eva demo --quick     # the CI form: fewer examples and steps

EVA init, then both methods fine-tuned for the same steps with the same seed, both evaluated on the
bundled SST-2 test slice; prints a table and writes plots and both adapters under ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text
from ..plots import plot_convergence, plot_loss_curves, plot_rank_heatmap
from ..run_config import build_run_config
from ..state import EvaState
from .train import STATE_DIR, train

FULL = dict(train_limit=None, eval_limit=None, max_steps=200, batch_size=16, learning_rate=1e-3)
QUICK = dict(train_limit=256, eval_limit=128, max_steps=16, batch_size=16, learning_rate=1e-3)
LOSS_STEPS = (5, 10, 25, 50, 100, 200)


def run_demo(output_dir: str = "out/demo", quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Fine-tune EVA and LoRA on SST-2 (bundled slice), evaluate both; returns the table rows."""
    settings = {**(QUICK if quick else FULL), "model": "minilm", "task": "sst2", "rank": 8, "seed": seed,
                "max_length": 64, "logging_steps": 2 if quick else 5, "warmup_ratio": 0.06,
                "eva": {"rho": 2.0, "progress": False}}
    base = build_run_config(preset=None, overrides=settings)
    root = Path(output_dir)
    results = {}
    for init in ("eva", "lora"):
        start = time.perf_counter()
        results[init] = train(dataclasses.replace(base, init=init, output_dir=str(root / init)))
        results[init]["total_seconds"] = round(time.perf_counter() - start, 2)
    state = EvaState.load(root / "eva" / STATE_DIR)
    plot_rank_heatmap(state, root / "ranks.png")
    plot_convergence(state, root / "convergence.png")
    plot_loss_curves({k: v["log"] for k, v in results.items()}, root / "loss.png")
    rows = [_row(init, m) for init, m in results.items()]
    atomic_write_text(root / "demo.json", json.dumps(rows, indent=2))
    return {"rows": rows, "table": format_table(rows), "eva_batches": state.n_batches,
            "eva_stop": state.stop_reason}


def _loss_at(log: list[dict[str, Any]], step: int) -> float | None:
    values = [e["loss"] for e in log if e["step"] == step]
    return values[0] if values else None


def _row(init: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"init": init, "init_seconds": metrics["init_seconds"], "train_seconds": metrics["train_seconds"],
            "steps": metrics["steps"], "loss": {s: _loss_at(metrics["log"], s) for s in LOSS_STEPS
                                                if _loss_at(metrics["log"], s) is not None},
            "final_train_loss": metrics["train_loss"], "accuracy": metrics["eval"]["sst2"]["accuracy"],
            "eval_examples": metrics["eval"]["sst2"]["n"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    steps = sorted({s for r in rows for s in r["loss"]})
    head = "| init | init s | train s | " + " | ".join(f"loss@{s}" for s in steps) + " | mean train loss | accuracy |"
    lines = [head, "|" + "---|" * (6 + len(steps))]
    for r in rows:
        losses = " | ".join(f"{r['loss'][s]:.4f}" if s in r["loss"] else "-" for s in steps)
        lines.append(f"| {r['init']} | {r['init_seconds']:.2f} | {r['train_seconds']:.1f} | {losses} | "
                     f"{r['final_train_loss']:.4f} | {100 * r['accuracy']:.2f}% |")
    return "\n".join(lines)
