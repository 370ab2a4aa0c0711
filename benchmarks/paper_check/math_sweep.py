"""Paper Table 3 analogue with every method at its own learning rate: SmolLM2-135M on GSM8K.

    # the plan plans/math_sweep.json: 15 selection runs, then 12 test runs (~4.5 h on 2 cores)
    python benchmarks/paper_check/math_sweep.py --max-minutes 100   # resumable, run it per sitting
    # the CI form: a tiny local causal LM, two rates, one seed
    python benchmarks/paper_check/math_sweep.py --quick --model <folder>

Why: at one shared rate a comparison of initialisations favours whichever method that rate suits;
tuned per method, LoRA initialisations often land within 1-2 % of each other ("Learning Rate
Matters", arXiv 2602.04998). So, as ``eva compare --lr`` does and fixed in the plan before any run:

1. **Selection** (seed 0): each method trains at each of the plan's rates on the GSM8K training
   rows minus a held-out fifth and is scored on questions of that fifth (never the test set). EVA's
   rho (1 or 2) is chosen the same way, together with the rate. Highest validation accuracy wins; a
   tie goes to the smaller rate, then to the variant the plan lists first.
2. **Test**: each method at its chosen rate (and variant), trained on all the training rows, seeds
   0-2, scored on a fixed subset of the GSM8K test questions, the same for every run.

The verdict (``report.py``, :func:`verdict`) is the plan's test: a paired bootstrap over seeds and
test questions of EVA's accuracy minus each baseline's, Holm over the three comparisons.

The recipe is the math part of ``lm_generation.py`` (the paper's: r 16, alpha 1, every linear layer
and the LM head, linear schedule, warm-up 0.03; sized to 2 CPU cores: 40 steps of batch 4,
SVD batch size 4), read from the plan so the two cannot differ.

Resumable over sittings and checkouts: every finished run leaves a small JSON (its settings, scores,
per-question correctness, loss log, the commit and the package modules that made it) in ``--runs``,
a folder committed with the results; a run whose file is there with the same settings is read back,
never trained again. The adapters themselves go to ``--work`` (not committed). Within a sitting, EVA
runs that differ only in the rate reuse the EVA state the first of them computed (it depends on
the data, seed and rho, not on the rate). ``--max-minutes`` stops starting new runs after that
long; the results written after each run hold everything finished so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import plans
from common import RESULTS, SHARED_DATA, resolve_data_dir
from item_tests import ALPHA, accuracy, holm, paired_bootstrap
from item_tests import verdict as item_verdict
from sweep import Grid, add_sitting_args, cell, choose, finish, not_finished, run_name

from eva_lora.app.recipes.train import PREDICTIONS_FILE

REPO = Path(__file__).resolve().parents[2]
RUNS = Path(__file__).parent / "runs" / "math_sweep"
EXPERIMENT = "math_sweep"
# the plan's CI form: the same steps on a tiny model and the test slices, in seconds
QUICK_PLAN: dict[str, Any] = {
    "model": None,  # --model
    "task": "gsm8k",
    "recipe": {
        "rank": 4,
        "lora_alpha": 1.0,
        "batch_size": 2,
        "svd_batch_size": 2,
        "max_length": 96,
        "max_steps": 3,
        "train_limit": 20,
        "max_new_tokens": 8,
        "logging_steps": 1,
        "eval_batch_size": 8,
        "eva": {"target_modules": "all-linear"},
    },
    "methods": [
        {"label": "LoRA", "init": "lora", "variants": {"-": {}}},
        {"label": "EVA", "init": "eva", "variants": {"rho=1": {"rho": 1.0}, "rho=2": {"rho": 2.0}}},
    ],
    "learning_rates": [0.0005, 0.001],
    "selection": {"validation": 0.25, "validation_questions": 4, "seed": 0},
    "seeds": [0],
    "test_questions": 4,
    "comparisons": [["EVA", "LoRA"]],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the CI form; --model must be given")
    parser.add_argument("--model", default=None, help="model for --quick (a tiny local causal LM)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_sitting_args(parser, RUNS, REPO / "out" / "paper_check" / EXPERIMENT)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"default {SHARED_DATA} (--quick: test slices)"
    )
    args = parser.parse_args(argv)
    if args.quick and not args.model:
        parser.error("--quick needs --model (a tiny local causal LM folder)")
    resolve_data_dir(parser, args, "gsm8k")
    if args.runs is None:
        args.runs = args.work / "runs" if args.quick else RUNS
    return args


def load_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {**QUICK_PLAN, "model": args.model}
    return plans.load(EXPERIMENT)


def settings(
    plan: dict[str, Any], method: dict[str, Any], variant: str, rate: float, seed: int, phase: str
) -> dict[str, Any]:
    """Everything a run depends on (what its record must match to be reused)."""
    recipe, selection = plan["recipe"], plan["selection"]
    validating = phase == "select"
    return {
        **{k: v for k, v in recipe.items() if k != "eva"},
        "model": plan["model"],
        "task": plan["task"],
        "init": method["init"],
        "seed": seed,
        "learning_rate": rate,
        "validation": selection["validation"] if validating else 0.0,
        "eval_limit": selection["validation_questions"] if validating else plan["test_questions"],
        "eva": {**recipe.get("eva", {}), **method["variants"][variant]},
    }


def describe(settings: dict[str, Any], out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's accuracy and per-question correctness on the questions it was scored on."""
    where = "validation" if settings["validation"] else settings["task"]
    items = json.loads((out / PREDICTIONS_FILE).read_text())[where]
    return {
        "accuracy": metrics["eval"][where]["accuracy"],
        "correct": items["correct"],
        "predictions": items["prediction"],
    }


def run(
    grid: Grid,
    plan: dict[str, Any],
    method: dict[str, Any],
    variant: str,
    rate: float,
    seed: int,
    phase: str,
) -> dict[str, Any] | None:
    return grid.run(
        settings(plan, method, variant, rate, seed, phase),
        run_name(method["label"], variant, rate, seed, phase),
        "accuracy",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = load_plan(args)
    grid = Grid(args, describe)
    selection: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    seed0 = plan["selection"]["seed"]
    # 1. selection, method by method; 2. a method's test runs once its selection is complete
    for method in plan["methods"]:
        label, variants = method["label"], list(method["variants"])
        scores = {}
        for variant in variants:
            for rate in plan["learning_rates"]:
                found = run(grid, plan, method, variant, rate, seed0, "select")
                if found is not None:
                    scores[(variant, rate)] = found["accuracy"]
                    selection.setdefault(label, {})[cell(variant, rate)] = found["accuracy"]
        if len(scores) < len(variants) * len(plan["learning_rates"]):
            continue
        variant, rate = choose(scores, variants)
        chosen[label] = {"variant": variant, "learning_rate": rate}
    for method in plan["methods"]:
        label = method["label"]
        if label not in chosen:
            continue
        for seed in plan["seeds"]:
            pick = chosen[label]
            found = run(grid, plan, method, pick["variant"], pick["learning_rate"], seed, "test")
            if found is not None:
                runs.setdefault(label, []).append({"seed": seed, **_short(found)})
    planned = sum(len(m["variants"]) for m in plan["methods"]) * len(plan["learning_rates"])
    planned += len(plan["methods"]) * len(plan["seeds"])
    finished = sum(map(len, selection.values())) + sum(map(len, runs.values()))
    record = {
        "quick": args.quick,
        "complete": finished == planned,
        "runs_finished": finished,
        "runs_planned": planned,
        "learning_rates": plan["learning_rates"],
        "seeds": plan["seeds"],
        "settings": {k: v for k, v in plan.items() if k in ("model", "task", "recipe")},
        "selection": selection,
        "chosen": chosen,
        "runs": runs,
        "comparisons": plan["comparisons"],
        "seconds": round(time.perf_counter() - grid.started, 1),
    }
    return finish(args, grid, EXPERIMENT, record, markdown)


def _short(record: dict[str, Any]) -> dict[str, Any]:
    """What the results file keeps of a test run (the runs folder keeps the rest)."""
    keep = ("accuracy", "correct", "train_loss", "init_seconds", "eva_batches", "train_seconds")
    return {k: record[k] for k in keep}


def verdict(record: dict[str, Any]) -> tuple[str, str]:
    """The plan's test: for each comparison "EVA at least as accurate as B", a paired bootstrap over
    seeds and test questions of the accuracy difference, Holm over the comparisons."""
    unfinished = not_finished(record)
    if unfinished:
        return unfinished
    runs = record["runs"]
    pairs = [(a, b) for a, b in record["comparisons"]]

    def correct(label: str) -> list[list[np.ndarray]]:
        return [[np.asarray(r["correct"], dtype=float)] for r in runs[label]]

    reference = [np.ones(len(runs[pairs[0][0]][0]["correct"]))]
    tested = [paired_bootstrap(accuracy, correct(a), correct(b), reference) for a, b in pairs]
    adjusted = holm([p for _, p in tested])
    found = [item_verdict(effect, p) for (effect, _), p in zip(tested, adjusted)]
    rates = ", ".join(
        f"{label} {c['learning_rate']:g}" + ("" if c["variant"] == "-" else f" ({c['variant']})")
        for label, c in record["chosen"].items()
    )
    text = (
        f"rates chosen on validation: {rates}; {len(record['seeds'])} seeds x "
        f"{len(reference[0])} test questions, paired bootstrap, Holm over {len(pairs)} "
        f"comparisons (alpha {ALPHA}): "
        + "; ".join(
            f"{a} vs {b} {100 * effect:+.2f} (p {p:.3f}, Holm {q:.3f}: {v})"
            for (a, b), (effect, p), q, v in zip(pairs, tested, adjusted, found)
        )
    )
    held = sum(v == "held" for v in found)
    if held == len(found):
        return "held", text
    if held:
        return f"partly ({held} of {len(found)} held)", text
    return ("contradicted" if "contradicted" in found else "not shown"), text


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} +/- {100 * spread:.2f}"


def markdown(record: dict[str, Any]) -> str:
    recipe = record["settings"]["recipe"]
    lines = [
        "## Table 3 analogue, each method at its own rate: SmolLM2-135M on GSM8K",
        "",
        f"`python benchmarks/paper_check/math_sweep.py{' --quick' if record['quick'] else ''}` "
        f"(plan `plans/math_sweep.json`; {record['runs_finished']} of {record['runs_planned']} "
        f"runs finished; {record.get('run_seconds', '?')} s of training and evaluation summed over "
        f"the runs, {record['seconds']} s in the last sitting, finished runs are read back). "
        f"{record['settings']['model']}, r {recipe['rank']}, alpha {recipe['lora_alpha']}, "
        f"{recipe['max_steps']} steps of batch {recipe['batch_size']}, rates "
        f"{', '.join(f'{r:g}' for r in record['learning_rates'])}.",
        "",
        "Selection (seed 0, trained on the training rows minus the held-out fifth; validation "
        "accuracy x 100 on held-out training questions; the chosen cell in bold):",
        "",
        "| method | " + " | ".join(f"lr {r:g}" for r in record["learning_rates"]) + " |",
        "|---" * (len(record["learning_rates"]) + 1) + "|",
    ]
    for label, scores in record["selection"].items():
        variants = sorted({cell.rsplit(" ", 1)[0] for cell in scores if " " in cell}) or ["-"]
        for variant in variants:
            cells = []
            for rate in record["learning_rates"]:
                key = cell(variant, rate)
                if key not in scores:
                    cells.append("-")
                    continue
                pick = record["chosen"].get(label)
                bold = pick and pick["variant"] == variant and pick["learning_rate"] == rate
                cells.append(f"**{100 * scores[key]:.2f}**" if bold else f"{100 * scores[key]:.2f}")
            name = label if variant == "-" else f"{label} {variant}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Test (each method at its chosen rate, trained on every training row; accuracy x 100 on "
        "the fixed test questions, mean +/- std over seeds):",
        "",
        "| method | chosen | seeds | accuracy | train loss | init s |",
        "|---|---|---|---|---|---|",
    ]
    for label, results in record["runs"].items():
        pick = record["chosen"][label]
        chosen = f"lr {pick['learning_rate']:g}" + (
            "" if pick["variant"] == "-" else f", {pick['variant']}"
        )
        seeds = ",".join(str(r["seed"]) for r in results)
        loss = statistics.fmean(r["train_loss"] for r in results)
        init = statistics.fmean(r["init_seconds"] for r in results)
        accuracy_cell = _mean_std([r["accuracy"] for r in results])
        lines.append(
            f"| {label} | {chosen} | {seeds} | {accuracy_cell} | {loss:.4f} | {init:.1f} |"
        )
    lines.append("")
    found, text = verdict(record)
    lines += [f"Verdict (the plan's test): **{found}**: {text}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
