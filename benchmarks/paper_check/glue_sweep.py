"""Paper Table 4 analogue with every method at its own learning rate: all-MiniLM-L6-v2 on GLUE.

    # the plan plans/glue_sweep.json: 75 selection runs, then 60 test runs (~80 min on 2 cores)
    python benchmarks/paper_check/glue_sweep.py --max-minutes 60   # resumable, run it per sitting
    # the CI form: two tasks, LoRA and EVA, two rates, one seed, a few steps on the test slices
    python benchmarks/paper_check/glue_sweep.py --quick

``table4.py`` trains every method at one shared rate (4e-3); this grid, fixed in its plan before
any run, gives each method its own (see ``sweep.py`` for why), as ``eva compare --lr`` does:

1. **Selection** (seed 0), per task: each method trains at each of the plan's rates on the task's
   training rows minus a held-out fifth and is scored on rows of that fifth (never the evaluation
   set) with the task's paper metric (Matthews for CoLA, Pearson for STS-B, accuracy otherwise).
   EVA's rho (1 or 2) is chosen together with the rate. The best score wins; a tie goes to the
   smaller rate, then to the variant the plan lists first.
2. **Test**: per task, each method at its chosen rate (and variant), trained on all the training
   rows, seeds 0-2, scored on the same fixed rows of the evaluation set as ``table4.py``.

The verdict (:func:`verdict`) is the plan's test, the one ``report.py`` applies to Table 4: a
paired bootstrap over seeds and evaluation items of the per-seed average over the tasks with
signal, EVA against each baseline, Holm over the three comparisons.

Resumable over sittings and checkouts: each finished run is a small JSON in ``--runs`` (committed
with the results), read back when its settings match (``sweep.Grid``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import plans
from common import RESULTS, SHARED_DATA, resolve_data_dir
from sweep import Grid, add_sitting_args, cell, choose, finish, not_finished, run_name

from eva_lora.app.recipes.train import PREDICTIONS_FILE
from eva_lora.app.tasks import get_task

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "glue_sweep"
RUNS = Path(__file__).parent / "runs" / EXPERIMENT
METRIC_NAMES = {
    "sst2": "SST-2 acc",
    "cola": "CoLA MCC",
    "mrpc": "MRPC acc",
    "stsb": "STS-B Pearson",
    "rte": "RTE acc",
}
# the plan's CI form: the same steps on the test slices, in seconds
QUICK_PLAN: dict[str, Any] = {
    "model": "minilm",
    "tasks": ["sst2", "stsb"],
    "steps": {"sst2": 2, "stsb": 2},
    "recipe": {
        "rank": 4,
        "lora_alpha": 1.0,
        "batch_size": 8,
        "max_length": 64,
        "svd_batch_size": 8,
        "train_limit": 40,
        "logging_steps": 1,
    },
    "methods": [
        {"label": "LoRA", "init": "lora", "variants": {"-": {}}},
        {"label": "EVA", "init": "eva", "variants": {"rho=2": {"rho": 2.0}}},
    ],
    "learning_rates": [0.001, 0.004],
    "selection": {"validation": 0.25, "validation_rows": 8, "seed": 0},
    "seeds": [0],
    "eval_limit": 16,
    "comparisons": [["EVA", "LoRA"]],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the CI form (test slices)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_sitting_args(parser, RUNS, REPO / "out" / "paper_check" / EXPERIMENT)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"default {SHARED_DATA} (--quick: test slices)"
    )
    args = parser.parse_args(argv)
    resolve_data_dir(parser, args, "glue")
    if args.runs is None:
        args.runs = args.work / "runs" if args.quick else RUNS
    return args


def settings(
    plan: dict[str, Any],
    task: str,
    method: dict[str, Any],
    variant: str,
    rate: float,
    seed: int,
    phase: str,
) -> dict[str, Any]:
    """Everything a run depends on (what its record must match to be reused)."""
    validating, recipe = phase == "select", plan["recipe"]
    return {
        **{k: v for k, v in recipe.items() if k != "eva"},
        "model": plan["model"],
        "task": task,
        "max_steps": plan["steps"][task],
        "init": method["init"],
        "seed": seed,
        "learning_rate": rate,
        "validation": plan["selection"]["validation"] if validating else 0.0,
        "eval_limit": plan["selection"]["validation_rows"] if validating else plan["eval_limit"],
        "eva": {**recipe.get("eva", {}), **method["variants"][variant]},
    }


def describe(run: dict[str, Any], out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's main score (the task's paper metric) and its per-item predictions."""
    where = "validation" if run["validation"] else run["task"]
    metric = get_task(run["task"]).main_metric
    items = json.loads((out / PREDICTIONS_FILE).read_text())[where]
    return {
        "metric": metric,
        "score": metrics["eval"][where][metric],
        "prediction": [round(p, 4) if isinstance(p, float) else p for p in items["prediction"]],
        "reference": items["reference"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else plans.load(EXPERIMENT)
    check_plan(plan)
    grid = Grid(args, describe)
    seed0, rates = plan["selection"]["seed"], plan["learning_rates"]

    def run(task: str, method: dict[str, Any], variant: str, rate: float, seed: int, phase: str):
        return grid.run(
            settings(plan, task, method, variant, rate, seed, phase),
            run_name(method["label"], variant, rate, seed, phase, task),
            "score",
        )

    # 1. every task's selection first (the choices are complete before any test run);
    selection: dict[str, dict[str, dict[str, float]]] = {}
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for task in plan["tasks"]:
        for method in plan["methods"]:
            label, variants = method["label"], list(method["variants"])
            scores = {}
            for variant in variants:
                for rate in rates:
                    found = run(task, method, variant, rate, seed0, "select")
                    if found is not None:
                        scores[(variant, rate)] = found["score"]
                        selection.setdefault(task, {}).setdefault(label, {})[
                            cell(variant, rate)
                        ] = found["score"]
            if len(scores) == len(variants) * len(rates):
                variant, rate = choose(scores, variants)
                chosen.setdefault(task, {})[label] = {"variant": variant, "learning_rate": rate}
    # 2. then each method's test seeds at its choice
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    items: dict[str, dict[str, Any]] = {}
    for task in plan["tasks"]:
        for method in plan["methods"]:
            pick = (chosen.get(task) or {}).get(method["label"])
            if pick is None:
                continue
            for seed in plan["seeds"]:
                found = run(task, method, pick["variant"], pick["learning_rate"], seed, "test")
                if found is not None:
                    keep(runs, items, task, method["label"], seed, found)
    planned = len(plan["tasks"]) * (
        sum(len(m["variants"]) for m in plan["methods"]) * len(rates)
        + len(plan["methods"]) * len(plan["seeds"])
    )
    finished = sum(len(c) for t in selection.values() for c in t.values())
    finished += sum(len(r) for t in runs.values() for r in t.values())
    record = {
        "quick": args.quick,
        "complete": finished == planned,
        "runs_finished": finished,
        "runs_planned": planned,
        "tasks": plan["tasks"],
        "steps": plan["steps"],
        "learning_rates": rates,
        "seeds": plan["seeds"],
        "settings": {"model": plan["model"], "recipe": plan["recipe"]},
        "selection": selection,
        "chosen": chosen,
        "runs": runs,
        "items": items,
        "comparisons": plan["comparisons"],
        "seconds": round(time.perf_counter() - grid.started, 1),
    }
    return finish(args, grid, EXPERIMENT, record, markdown)


def check_plan(plan: dict[str, Any]) -> None:
    """The plan names what this script can run (before any run, so a typo costs no time)."""
    from eva_lora.app.initializers import get_init_method

    unknown = [t for t in plan["tasks"] if t not in METRIC_NAMES or t not in plan["steps"]]
    if unknown:
        raise ValueError(f"plans/{EXPERIMENT}.json: tasks {unknown} unknown or without steps")
    for method in plan["methods"]:
        get_init_method(method["init"])  # a ValueError names an unknown init
    labels = {m["label"] for m in plan["methods"]}
    if any(a not in labels or b not in labels for a, b in plan["comparisons"]):
        raise ValueError(f"plans/{EXPERIMENT}.json compares a method it does not run")


def keep(
    runs: dict[str, Any], items: dict[str, Any], task: str, label: str, seed: int, found: dict
) -> None:
    """A test run's score (``runs``) and per-item predictions (``items``, seed order); every run of
    a task must score the same rows, checked. In a partial grid a missing seed shifts the later
    ones' positions; the verdict is only computed on a complete grid, where every seed is there."""
    runs.setdefault(task, {}).setdefault(label, []).append(
        {
            "seed": seed,
            "metric": found["metric"],
            "score": found["score"],
            "learning_rate": found["settings"]["learning_rate"],
            "train_loss": found["train_loss"],
            "init_seconds": found["init_seconds"],
            "eva_batches": found["eva_batches"],
        }
    )
    entry = items.setdefault(task, {"reference": found["reference"], "predictions": {}})
    if entry["reference"] != found["reference"]:
        raise ValueError(f"{task}: {label} was scored on other evaluation rows than earlier runs")
    entry["predictions"].setdefault(label, []).append(found["prediction"])


def verdict(record: dict[str, Any]) -> tuple[str, str]:
    """The plan's test (``report.item_table_verdict``, as for Table 4), once the grid is done."""
    unfinished = not_finished(record)
    if unfinished:
        return unfinished
    from report import item_table_verdict

    found, text = item_table_verdict(record, [tuple(c) for c in record["comparisons"]])
    rates = "; ".join(
        f"{task}: " + ", ".join(f"{label} {_choice(c)}" for label, c in picks.items())
        for task, picks in record["chosen"].items()
    )
    return found, f"rates chosen on validation ({rates}); {text}"


def _choice(pick: dict[str, Any]) -> str:
    variant = "" if pick["variant"] == "-" else f" ({pick['variant']})"
    return f"{pick['learning_rate']:g}{variant}"


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} +/- {100 * spread:.2f}"


def markdown(record: dict[str, Any]) -> str:
    recipe, rates = record["settings"]["recipe"], record["learning_rates"]
    lines = [
        "## Table 4 analogue, each method at its own rate: all-MiniLM-L6-v2 on GLUE",
        "",
        f"`python benchmarks/paper_check/glue_sweep.py{' --quick' if record['quick'] else ''}` "
        f"(plan `plans/glue_sweep.json`; {record['runs_finished']} of {record['runs_planned']} "
        f"runs finished; {record.get('run_seconds', '?')} s of training and evaluation summed over "
        f"the runs, {record['seconds']} s in the last sitting, finished runs are read back). "
        f"{record['settings']['model']}, r {recipe['rank']}, alpha {recipe['lora_alpha']}, batch "
        f"{recipe['batch_size']}, steps "
        + ", ".join(f"{t} {record['steps'][t]}" for t in record["tasks"])
        + f"; rates {', '.join(f'{r:g}' for r in rates)}.",
        "",
        "Selection (seed 0, trained on the training rows minus the held-out fifth; score x 100 on "
        "held-out training rows, the task's paper metric; the chosen cell in bold):",
        "",
        "| task | method | " + " | ".join(f"lr {r:g}" for r in rates) + " |",
        "|---|---" + "|---" * len(rates) + "|",
    ]
    for task, methods in record["selection"].items():
        for label, scores in methods.items():
            variants = sorted({c.rsplit(" ", 1)[0] for c in scores if " " in c}) or ["-"]
            pick = (record["chosen"].get(task) or {}).get(label)
            for variant in variants:
                cells = []
                for rate in rates:
                    key = cell(variant, rate)
                    if key not in scores:
                        cells.append("-")
                        continue
                    bold = pick and pick["variant"] == variant and pick["learning_rate"] == rate
                    text = f"{100 * scores[key]:.2f}"
                    cells.append(f"**{text}**" if bold else text)
                name = label if variant == "-" else f"{label} {variant}"
                lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    tasks = [t for t in record["tasks"] if t in record["runs"]]
    methods = list(dict.fromkeys(m for t in tasks for m in record["runs"][t]))
    lines += [
        "",
        "Test (each method at its chosen rate per task, trained on every training row; score x 100 "
        "on the fixed evaluation rows, mean +/- std over seeds; the rate in brackets):",
        "",
        "| method | " + " | ".join(METRIC_NAMES.get(t, t) for t in tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for label in methods:
        row = []
        for task in tasks:
            results = record["runs"][task].get(label, [])
            if not results:
                row.append("-")
                continue
            row.append(
                f"{_mean_std([r['score'] for r in results])} "
                f"({results[0]['learning_rate']:g}, {len(results)} seed"
                f"{'s' if len(results) > 1 else ''})"
            )
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    found, text = verdict(record)
    lines += ["", f"Verdict (the plan's test): **{found}**: {text}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
