"""Paper Table 4 analogue: LoRA, EVA (rho 1, 2), PiSSA, OLoRA, DoRA and EVA+DoRA on five GLUE tasks.

    # 7 methods x 5 tasks x 3 seeds (~75 min, 2 cores)
    python benchmarks/paper_check/table4.py
    # LoRA and EVA, 1 seed, 4 steps, test slices (CI)
    python benchmarks/paper_check/table4.py --quick

all-MiniLM-L6-v2 fine-tuned on SST-2, CoLA, MRPC, STS-B and RTE from ``--data-dir`` (default
``../shared/data``), scored with the paper's metrics (Matthews for CoLA, Pearson for STS-B, accuracy
otherwise). The paper's grids (rank {2, 4, 6, 8}, lr {4e-3, 1e-3, 4e-4}, full epochs) are reduced to
one point that fits 2 CPU cores: r 8, alpha 1, lr 4e-3 (the top of the paper's DeBERTa grid), batch
16, max length 128, STEPS[task] optimiser steps (more on the cheap single-sentence tasks, fewer on
the long RTE pairs), SVD batch size 8, and a fixed random subset of EVAL_LIMIT evaluation examples
(the same rows for every run). Each run is the ``eva train`` recipe; finished runs are kept under
``--work`` and reused when their settings match, so an interrupted grid continues where it stopped.

The full grid (tasks, steps, seeds, methods, rate, evaluation rows and the test that judges it) is
read from the pre-registered plan ``plans/table4.json`` and the result is stamped with it (see
``plans.py``); every run's per-item predictions are kept, so ``report.py`` tests over evaluation
items as well as seeds (``item_tests.py``) and corrects for the plan's comparisons (Holm).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import plans
from common import (
    RESULTS,
    SHARED_DATA,
    TEST_DATA,
    made_by,
    made_by_runs,
    pyplot,
    record_made_by,
    resolve_data_dir,
    save_png,
    write_results,
)

from eva_lora.app.recipes.compare import headline
from eva_lora.app.recipes.run_folder import same_settings
from eva_lora.app.recipes.train import METRICS_FILE, PREDICTIONS_FILE, train
from eva_lora.app.run_config import RunConfig, build_run_config

REPO = Path(__file__).resolve().parents[2]

# (row label, init method, EvaConfig overrides); the paper's
# Table 4 rows that PEFT and eva-lora provide.
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("LoRA", "lora", {}),
    ("EVA rho=1", "eva", {"rho": 1.0}),
    ("EVA rho=2", "eva", {"rho": 2.0}),
    ("PiSSA", "pissa", {}),
    ("OLoRA", "olora", {}),
    ("DoRA", "dora", {}),
    ("EVA+DoRA rho=2", "eva-dora", {"rho": 2.0}),
]
TASKS = ["sst2", "cola", "mrpc", "stsb", "rte"]
STEPS = {"sst2": 100, "cola": 150, "mrpc": 60, "stsb": 80, "rte": 40}  # ~70 min in all on 2 cores
EVAL_LIMIT = 500
SETTINGS = dict(
    model="minilm",
    rank=8,
    lora_alpha=1.0,
    learning_rate=4e-3,
    batch_size=16,
    warmup_ratio=0.06,
    scheduler="linear",
    max_length=128,
    svd_batch_size=8,
    logging_steps=10,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced form, run by the test suite")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for table4.md / .json / .png"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"GLUE files in the ../shared/data layout (default {SHARED_DATA}; "
        f"--quick: the test slices in {TEST_DATA})",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "out" / "paper_check" / "table4",
        help="where each run's adapter and metrics.json go (finished runs are reused)",
    )
    args = parser.parse_args(argv)
    resolve_data_dir(parser, args, "glue")
    return args


def grid(
    quick: bool,
) -> tuple[list[tuple[str, str, dict[str, Any]]], list[int], dict[str, Any], dict[str, int]]:
    """(methods, seeds, run settings, steps per task) of the full table (its plan) or for CI."""
    if quick:
        return (
            [m for m in METHODS if m[0] in ("LoRA", "EVA rho=2")],
            [0],
            {
                **SETTINGS,
                "batch_size": 8,
                "max_length": 64,
                "train_limit": 32,
                "eval_limit": 16,
                "logging_steps": 2,
            },
            dict.fromkeys(TASKS, 4),
        )
    plan = plans.load("table4")
    known = {m[0]: m for m in METHODS}
    unknown = [m for m in plan["methods"] if m not in known]
    if unknown or plan["model"] != SETTINGS["model"] or plan["tasks"] != TASKS:
        raise ValueError(
            f"plans/table4.json does not match this script: methods {unknown} unknown, model "
            f"{plan['model']}, tasks {plan['tasks']} (script: {SETTINGS['model']}, {TASKS})"
        )
    settings = {
        **SETTINGS,
        "eval_limit": plan["eval_limit"],
        "learning_rate": plan["learning_rate"],
    }
    return [known[m] for m in plan["methods"]], plan["seeds"], settings, plan["steps"]


def run_one(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], bool]:
    """(metrics, per-item predictions, what made it, reused): a finished run with the same
    settings, its predictions and the record of the process that trained it
    (``common.record_made_by``) is read back instead of trained again."""
    folder = Path(cfg.output_dir)
    done, items, made = folder / METRICS_FILE, folder / PREDICTIONS_FILE, made_by(folder)
    if done.is_file() and items.is_file() and made is not None:
        metrics = json.loads(done.read_text())
        if same_settings(metrics.get("config") or {}, cfg):
            return metrics, json.loads(items.read_text()), made, True
    metrics = train(cfg)
    return metrics, json.loads(items.read_text()), record_made_by(folder), False


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods, seeds, settings, steps = grid(args.quick)
    started = time.perf_counter()
    # task -> method label -> per-seed results
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    # task -> {"reference": [...], "predictions": {label: [per-seed predictions]}}
    items: dict[str, dict[str, Any]] = {}
    total, done = len(TASKS) * len(methods) * len(seeds), 0
    made: list[dict[str, Any]] = []  # what made each run (runs read back were made earlier)
    for task in TASKS:
        for label, init, eva in methods:
            for seed in seeds:
                out = args.work / task / label.replace(" ", "_").replace("+", "-") / f"seed{seed}"
                cfg = build_run_config(
                    overrides={
                        **settings,
                        "task": task,
                        "init": init,
                        "seed": seed,
                        "max_steps": steps[task],
                        "data_dir": str(args.data_dir),
                        # unfinished: again
                        "output_dir": str(out),
                        "overwrite": True,
                        "progress": False,
                        "eva": {**eva},
                    }
                )
                run_started = time.perf_counter()
                metrics, predicted, made_run, reused = run_one(cfg)
                made.append(made_run)
                store_items(items, task, label, predicted[task])
                metric, score = headline(metrics, task)
                done += 1
                print(
                    f"[{done}/{total}] {task} {label} seed {seed}: {metric} {score:.4f} "
                    f"({'reused' if reused else f'{time.perf_counter() - run_started:.0f} s'}, "
                    f"{time.perf_counter() - started:.0f} s so far)",
                    file=sys.stderr,
                    flush=True,
                )
                runs.setdefault(task, {}).setdefault(label, []).append(
                    {
                        "seed": seed,
                        "metric": metric,
                        "score": score,
                        "train_loss": metrics["train_loss"],
                        "init_seconds": metrics["init_seconds"],
                        "train_seconds": metrics["train_seconds"],
                        "eva_batches": (metrics.get("eva") or {}).get("n_batches"),
                    }
                )
    record = {
        "quick": args.quick,
        "seeds": seeds,
        "settings": settings,
        "steps": steps,
        "tasks": TASKS,
        "methods": [m[0] for m in methods],
        "runs": runs,
        "items": items,
        "summary": summarise(runs, [m[0] for m in methods]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not args.quick:
        record["plan"] = plans.stamp("table4")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(record, args.out / "table4.png")
    write_results(
        args.out,
        "table4",
        record,
        markdown(record),
        **made_by_runs(made),
    )


def store_items(items: dict[str, Any], task: str, label: str, run: dict[str, Any]) -> None:
    """Keep one run's per-item predictions (seed order); every run scores the same rows, checked."""
    entry = items.setdefault(task, {"reference": run["reference"], "predictions": {}})
    if entry["reference"] != run["reference"]:
        raise ValueError(f"{task}: {label} was scored on other evaluation rows than earlier runs")
    predictions = [round(p, 4) if isinstance(p, float) else p for p in run["prediction"]]
    entry["predictions"].setdefault(label, []).append(predictions)


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarise(
    runs: dict[str, dict[str, list[dict[str, Any]]]], methods: list[str]
) -> dict[str, Any]:
    """Per method: mean/std over seeds of each task's score and of the per-seed mean over tasks."""
    out: dict[str, Any] = {}
    for label in methods:
        per_task = {task: _mean_std([r["score"] for r in runs[task][label]]) for task in runs}
        n_seeds = len(next(iter(runs.values()))[label])
        averages = [
            statistics.fmean(runs[task][label][k]["score"] for task in runs) for k in range(n_seeds)
        ]
        out[label] = {
            "tasks": per_task,
            "average": _mean_std(averages),
            "train_loss": statistics.fmean(r["train_loss"] for t in runs for r in runs[t][label]),
            "init_seconds": statistics.fmean(
                r["init_seconds"] for t in runs for r in runs[t][label]
            ),
        }
    return out


METRIC_NAMES = {
    "sst2": "SST-2 acc",
    "cola": "CoLA MCC",
    "mrpc": "MRPC acc",
    "stsb": "STS-B Pearson",
    "rte": "RTE acc",
}


def markdown(record: dict[str, Any]) -> str:
    s, summary, tasks = record["settings"], record["summary"], record["tasks"]
    lines = [
        "## Table 4 analogue: GLUE with LoRA, EVA, PiSSA, OLoRA, DoRA, EVA+DoRA",
        "",
        f"`python benchmarks/paper_check/table4.py{' --quick' if record['quick'] else ''}` "
        f"({record['seconds']} s). all-MiniLM-L6-v2; batch {s['batch_size']}, steps per task "
        + ", ".join(f"{METRIC_NAMES[t].split()[0]} {record['steps'][t]}" for t in tasks)
        + ", "
        f"lr {s['learning_rate']}, r {s['rank']}, alpha {s['lora_alpha']}, warm-up "
        f"{s['warmup_ratio']}, linear schedule, max length {s['max_length']}; "
        f"{s.get('eval_limit') or 'all'} evaluation examples per task (a fixed random subset; the "
        "whole set when smaller, as RTE's 277); SVD batch size "
        f"{s['svd_batch_size']}; seeds {record['seeds']}. "
        "Scores x 100, mean +/- std over seeds; the average is taken per seed, then over seeds. "
        "Best mean per column in bold.",
        "",
        "| method | "
        + " | ".join(METRIC_NAMES[t] for t in tasks)
        + " | average | train loss | init s |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    best = {t: max(summary[m]["tasks"][t]["mean"] for m in summary) for t in tasks}
    best["average"] = max(summary[m]["average"]["mean"] for m in summary)
    for label, row in summary.items():
        cells = []
        for key, value in [(t, row["tasks"][t]) for t in tasks] + [("average", row["average"])]:
            text = f"{100 * value['mean']:.2f} +/- {100 * value['std']:.2f}"
            cells.append(f"**{text}**" if value["mean"] == best[key] else text)
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {row['train_loss']:.4f} | {row['init_seconds']:.2f} |"
        )
    lines += ["", *reading(record), ""]
    return "\n".join(lines)


def reading(record: dict[str, Any]) -> list[str]:
    """The comparison the paper makes (EVA vs LoRA and the other inits), stated with its numbers."""
    summary, tasks = record["summary"], record["tasks"]
    eva_rows = [m for m in summary if m.startswith("EVA rho")]
    if "LoRA" not in summary or not eva_rows:
        return []
    lora = summary["LoRA"]
    out = ["Reading:"]
    for eva in eva_rows:
        diffs = {t: summary[eva]["tasks"][t]["mean"] - lora["tasks"][t]["mean"] for t in tasks}
        beyond = [
            t
            for t in tasks
            if abs(diffs[t]) > max(summary[eva]["tasks"][t]["std"], lora["tasks"][t]["std"])
        ]
        out.append(
            f"- {eva} vs LoRA: average "
            f"{100 * (summary[eva]['average']['mean'] - lora['average']['mean']):+.2f}"
            f"; higher on {sum(d > 0 for d in diffs.values())} of {len(tasks)} tasks; per task "
            + ", ".join(f"{METRIC_NAMES[t]} {100 * diffs[t]:+.2f}" for t in tasks)
            + f". Differences larger than the std over seeds: {', '.join(beyond) or 'none'}."
        )
    ranking = sorted(summary, key=lambda m: -summary[m]["average"]["mean"])
    out.append(
        "- Ranking by average: "
        + " > ".join(f"{m} ({100 * summary[m]['average']['mean']:.2f})" for m in ranking)
        + "."
    )
    if "DoRA" in summary and "EVA+DoRA rho=2" in summary:
        gap = summary["EVA+DoRA rho=2"]["average"]["mean"] - summary["DoRA"]["average"]["mean"]
        out.append(f"- EVA+DoRA vs DoRA: average {100 * gap:+.2f}.")
    return out


def plot(record: dict[str, Any], path: Path) -> None:
    """One panel per task: mean +/- std per method, so overlaps between methods are visible."""
    plt = pyplot()
    tasks, summary = record["tasks"] + ["average"], record["summary"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.0 * len(tasks), 3.6), sharey=False)
    for ax, task in zip(axes, tasks):
        cells = [summary[m]["average" if task == "average" else "tasks"] for m in summary]
        cells = [c if task == "average" else c[task] for c in cells]
        ax.bar(
            range(len(summary)),
            [100 * c["mean"] for c in cells],
            yerr=[100 * c["std"] for c in cells],
            color=[f"C{i}" for i in range(len(summary))],
            capsize=3,
        )
        ax.set_xticks(range(len(summary)), list(summary), rotation=70, fontsize=7)
        ax.set_title(METRIC_NAMES.get(task, "average"), fontsize=9)
        low = min(100 * (c["mean"] - c["std"]) for c in cells)
        ax.set_ylim(bottom=max(0.0, low - 5))
    fig.suptitle(
        "Table 4 analogue: all-MiniLM-L6-v2 on GLUE (mean +/- std over seeds)", fontsize=10
    )
    save_png(fig, path)


if __name__ == "__main__":
    main()
