"""The main job on a real pretrained causal LM: EVA vs random LoRA, SmolLM2-135M-Instruct, GSM8K.

    eva demo                   # SmolLM2 on math (bundled GSM8K slices), ~3-4 min on 2 CPU cores
    eva demo --model minilm    # all-MiniLM-L6-v2 on SST-2 (bundled), ~2.5 min
    eva demo --quick           # the CI form: smaller batches, fewer examples and steps

EVA computes its components on the training data (the paper's language-generation recipe: adapters
on every linear layer including the LM head, r 16, alpha 1, AdamW, linear schedule, only the
response trained and, with the label mask, only response tokens in EVA's PCA); then EVA and random
LoRA are fine-tuned for the same steps with the same seed and data order and both evaluated on
held-out questions (exact match of the final number, greedy decoding). Prints EVA's init time and
rank spread, a line per logging step, and a table of early and final loss and accuracy; writes
plots and both adapters (with model cards) under ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ...files import atomic_write_text
from ...model_card import rank_summary
from ...state import STATE_DIR, EvaState
from ..plots import plot_convergence, plot_diagnostics, plot_loss_curves, plot_rank_heatmap
from ..run_config import build_run_config
from .train import StepLines, train

SETUPS: dict[str, dict[str, Any]] = {
    # Sized to fit about 6 minutes on 2 CPU cores with the first dequantisation of SmolLM2 included.
    # Measured 2026-11-25 on 2 cores: 40 steps and 40 questions x 160 new tokens took ~12 min; then
    # 20 steps, 24 questions x 128 tokens and 60 EVA batches checked at every batch took 7.7 min
    # (EVA's init 151 s, 2.5 s a batch, mostly the solves). Now 24 EVA batches, solved every second
    # batch: 7 min 41 s (EVA's init 90 s, training 136 s + 116 s, generation ~50 s per init). Now 16
    # steps, 16 questions and 16 EVA batches: `make demo` on a fresh clone with an empty model cache
    # took 5 min 49 s (2026-11-26, EVA's init 47 s). With the engine of issue 24, EVA may run until
    # it converges (36 batches, 45 s) and the whole `make demo` took 3 min 3 s with the model cached
    # (2026-12-05).
    "smollm2": dict(
        model="smollm2",
        task="gsm8k",
        rank=16,
        lora_alpha=1.0,
        learning_rate=1e-3,
        batch_size=4,
        grad_accum=1,
        max_length=200,
        drop_long=True,
        train_limit=600,
        eval_limit=16,
        max_new_tokens=128,
        eval_batch_size=16,
        svd_batch_size=4,
        warmup_ratio=0.03,
        max_steps=16,
        logging_steps=4,
        eva={"target_modules": "all-linear-and-head", "max_batches": 80, "check_every": 2},
    ),
    "minilm": dict(
        model="minilm",
        task="sst2",
        rank=8,
        learning_rate=1e-3,
        batch_size=16,
        max_length=64,
        max_steps=200,
        logging_steps=5,
        warmup_ratio=0.06,
        eva={"rho": 2.0},
    ),
}
QUICK = {
    "smollm2": dict(
        train_limit=48,
        eval_limit=4,
        batch_size=2,
        svd_batch_size=2,
        max_new_tokens=24,
        max_steps=5,
        logging_steps=1,
        eva={"max_batches": 6},
    ),
    "minilm": dict(train_limit=256, eval_limit=128, max_steps=16, logging_steps=2),
}
LOSS_STEPS = (4, 8, 16, 25, 50, 100, 200)


def settings(model: str, quick: bool, seed: int) -> dict[str, Any]:
    if model not in SETUPS:
        raise ValueError(f"the demo runs on {' or '.join(SETUPS)}, not {model!r}")
    base = {**SETUPS[model], "seed": seed, "progress": False}
    if quick:
        extra = dict(QUICK[model])
        base = {**base, **extra, "eva": {**base.get("eva", {}), **extra.get("eva", {})}}
    return base


def run_demo(
    output_dir: str = "out/demo", quick: bool = False, seed: int = 0, model: str = "smollm2"
) -> dict:
    """Fine-tune EVA and LoRA on the same data and steps, evaluate both; returns the table rows."""
    base = build_run_config(overrides=settings(model, quick, seed))
    root = Path(output_dir)
    results = {}
    with warnings.catch_warnings():
        _quiet_known_warnings()
        for init in ("eva", "lora"):
            print(
                f"{init}: fine-tuning {base.model} on {base.task} for {base.max_steps} steps",
                file=sys.stderr,
            )
            start = time.perf_counter()
            results[init] = train(
                dataclasses.replace(base, init=init, output_dir=str(root / init), overwrite=True),
                callbacks=[StepLines(init)],
            )
            results[init]["total_seconds"] = round(time.perf_counter() - start, 2)
            if init == "eva":
                print(
                    eva_summary(
                        EvaState.load(root / "eva" / STATE_DIR), results[init]["init_seconds"]
                    ),
                    file=sys.stderr,
                )
    state = EvaState.load(root / "eva" / STATE_DIR)
    plot_rank_heatmap(state, root / "ranks.png")
    plot_convergence(state, root / "convergence.png")
    plot_diagnostics(state, root / "diagnostics.png")
    plot_loss_curves({k: v["log"] for k, v in results.items()}, root / "loss.png")
    rows = [_row(init, m, base.task) for init, m in results.items()]
    atomic_write_text(root / "demo.json", json.dumps(rows, indent=2))
    return {
        "rows": rows,
        "table": format_table(rows),
        "eva_batches": state.n_batches,
        "eva_stop": state.stop_reason,
        "eva_summary": eva_summary(state, results["eva"]["init_seconds"]),
    }


def _quiet_known_warnings() -> None:
    """Warnings our own calls trigger in transformers / PEFT that say nothing to a demo user."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*longer than max_length.*")
    warnings.filterwarnings("ignore", message=".*EVA stopped.*")
    # the paper adapts the LM head; SmolLM2 ties it to the
    # embeddings, and the adapter sits on the head only
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")


def eva_summary(state: EvaState, seconds: float) -> str:
    ranks = list(state.ranks.values())
    by_type = ", ".join(f"{kind} {mean:.1f}" for kind, _, _, mean, _ in rank_summary(state.ranks))
    return (
        f"EVA init: {seconds:.1f} s, {state.n_batches} batches, {state.n_tokens} tokens, stop: "
        f"{state.stop_reason}; ranks min {min(ranks)} / mean {sum(ranks) / len(ranks):.1f} / max "
        f"{max(ranks)} "
        f"over {len(ranks)} layers ({sum(r == 0 for r in ranks)} at 0); mean rank by type: "
        f"{by_type}"
    )


def _loss_at(log: list[dict[str, Any]], step: int) -> float | None:
    values = [e["loss"] for e in log if e["step"] == step]
    return values[0] if values else None


def _row(init: str, metrics: dict[str, Any], task: str) -> dict[str, Any]:
    evaluation = metrics["eval"][task]
    return {
        "init": init,
        "init_seconds": metrics["init_seconds"],
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "loss": {
            s: _loss_at(metrics["log"], s)
            for s in LOSS_STEPS
            if _loss_at(metrics["log"], s) is not None
        },
        "final_train_loss": metrics["train_loss"],
        "accuracy": evaluation["accuracy"],
        "eval_examples": evaluation["n"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    steps = sorted({s for r in rows for s in r["loss"]})
    columns = [
        "init",
        "init s",
        "train s",
        *[f"loss@{s}" for s in steps],
        "mean train loss",
        "accuracy",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        losses = [f"{r['loss'][s]:.4f}" if s in r["loss"] else "-" for s in steps]
        cells = [
            r["init"],
            f"{r['init_seconds']:.2f}",
            f"{r['train_seconds']:.1f}",
            *losses,
            f"{r['final_train_loss']:.4f}",
            f"{100 * r['accuracy']:.2f}% of {r['eval_examples']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
