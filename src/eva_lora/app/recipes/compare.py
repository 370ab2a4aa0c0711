"""Several initialisations x seeds on one task: a table of mean +/- std (markdown and CSV).

    eva compare --task sst2 --inits lora,eva,pissa --seeds 0,1,2 max_steps=50

Each run is a normal ``eva train`` into ``<output_dir>/<init>/seed<k>``; a finished run (its
metrics.json exists) is reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from pathlib import Path
from typing import Any

from ...files import atomic_write_text
from ..initializers import get_init_method
from ..run_config import RunConfig
from ..tasks import eval_tasks
from .train import METRICS_FILE, train, validate


def headline(metrics: dict[str, Any], task: str) -> tuple[str, float]:
    """(name, value) of the task's main score in a run's metrics (the mean accuracy for common sense)."""
    tasks = eval_tasks(task)
    if len(tasks) > 1:
        metric = tasks[0].main_metric
        key = "mean_accuracy" if metric == "accuracy" else f"mean_{metric}"
        return key, metrics["eval"][key]
    return tasks[0].main_metric, metrics["eval"][tasks[0].name][tasks[0].main_metric]


def run_compare(cfg: RunConfig, inits: list[str], seeds: list[int]) -> dict[str, Any]:
    """Train every (init, seed); write comparison.md / comparison.csv / comparison.json; return the summary."""
    if not inits or not seeds:
        raise ValueError("compare needs at least one init and one seed")
    for name in inits:
        get_init_method(name)
    validate(cfg)
    root = Path(cfg.output_dir)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in inits:
        for seed in seeds:
            out = root / name / f"seed{seed}"
            done = out / METRICS_FILE
            run_cfg = dataclasses.replace(cfg, init=name, seed=seed, output_dir=str(out), resume=False,
                                          overwrite=True)  # an unfinished run starts again
            metrics = json.loads(done.read_text()) if done.is_file() else train(run_cfg)
            runs.setdefault(name, []).append(metrics)
    summary = summarise(runs, cfg.task)
    atomic_write_text(root / "comparison.md", to_markdown(summary))
    atomic_write_text(root / "comparison.csv", to_csv(summary))
    atomic_write_text(root / "comparison.json", json.dumps({"summary": summary, "runs": runs}, indent=2, default=str))
    return {"summary": summary, "runs": runs}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, list[dict[str, Any]]], task: str) -> list[dict[str, Any]]:
    rows = []
    for name, results in runs.items():
        metric, _ = headline(results[0], task)
        score = _mean_std([headline(r, task)[1] for r in results])
        loss = _mean_std([r["train_loss"] for r in results])
        init = _mean_std([r["init_seconds"] for r in results])
        rows.append({"init": name, "seeds": len(results), "metric": metric, "mean": score[0], "std": score[1],
                     "train_loss_mean": loss[0], "train_loss_std": loss[1], "init_seconds_mean": init[0]})
    return rows


def to_markdown(summary: list[dict[str, Any]]) -> str:
    lines = ["| init | seeds | metric | mean +/- std | train loss | init s |", "|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['init']} | {r['seeds']} | {r['metric']} | {100 * r['mean']:.2f} +/- {100 * r['std']:.2f} "
                     f"| {r['train_loss_mean']:.4f} +/- {r['train_loss_std']:.4f} | {r['init_seconds_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def to_csv(summary: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
    return buffer.getvalue()
