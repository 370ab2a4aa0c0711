"""Several initialisations x seeds on one task: a table of mean +/- std (markdown and CSV).

    eva compare --task sst2 --inits lora,eva,pissa --seeds 0,1,2 max_steps=50
    # each init at its own best rate
    eva compare --task sst2 --inits lora,eva --lr 1e-4,3e-4,1e-3

Each run is a normal ``eva train`` into ``<output_dir>/<init>/seed<k>``; a finished run (its
metrics.json exists) is reused, so an interrupted comparison continues where it stopped.

With ``--lr``, each init's learning rate is chosen before any test score is seen: one run per rate
(the first seed) trains on the training rows minus a held-out ``validation`` fraction (20 % unless
set) and is scored on those held-out rows; the rate with the best validation score wins (a tie goes
to the smaller rate, a rule fixed here, not after the results). Then every seed trains on all the
training rows at the chosen rate and is scored on the test set. After tuning, LoRA initialisations
often land within 1-2 % of each other ("Learning Rate Matters", arXiv 2602.04998): a comparison at
one shared rate favours whichever method that rate suits.
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
    """(name, value) of the task's main score in a run's metrics (common sense: mean accuracy)."""
    tasks = eval_tasks(task)
    if len(tasks) > 1:
        metric = tasks[0].main_metric
        key = "mean_accuracy" if metric == "accuracy" else f"mean_{metric}"
        return key, metrics["eval"][key]
    return tasks[0].main_metric, metrics["eval"][tasks[0].name][tasks[0].main_metric]


DEFAULT_VALIDATION = 0.2  # share of the training rows held out to choose a learning rate


def run_compare(
    cfg: RunConfig, inits: list[str], seeds: list[int], lrs: list[float] | None = None
) -> dict[str, Any]:
    """Train every (init, seed); write comparison.md / comparison.csv / comparison.json; return the
    summary. With ``lrs``, each init's rate is chosen on held-out training rows first (module
    docstring)."""
    if not inits or not seeds:
        raise ValueError("compare needs at least one init and one seed")
    if lrs is not None and (not lrs or any(not lr > 0 for lr in lrs)):
        raise ValueError(f"--lr needs positive learning rates, got {lrs}")
    for name in inits:
        get_init_method(name)
    validate(cfg)
    root = Path(cfg.output_dir)
    chosen, selection = {}, {}
    for name in inits:
        if lrs:
            selection[name] = {lr: _validation_score(cfg, name, seeds[0], lr, root) for lr in lrs}
            chosen[name] = max(lrs, key=lambda lr: (selection[name][lr], -lr))
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in inits:
        rate = chosen.get(name, cfg.learning_rate)
        for seed in seeds:
            out = root / name / (f"seed{seed}" + (f"-lr{rate:g}" if lrs else ""))
            run_cfg = dataclasses.replace(
                cfg, init=name, seed=seed, learning_rate=rate, validation=0.0, output_dir=str(out)
            )
            runs.setdefault(name, []).append(_run(run_cfg))
    summary = summarise(runs, cfg.task)
    for row in summary:
        row["learning_rate"] = chosen.get(row["init"], cfg.learning_rate)
        row["validation_scores"] = {
            f"{lr:g}": v for lr, v in selection.get(row["init"], {}).items()
        }
    atomic_write_text(root / "comparison.md", to_markdown(summary))
    atomic_write_text(root / "comparison.csv", to_csv(summary))
    atomic_write_text(
        root / "comparison.json",
        json.dumps({"summary": summary, "runs": runs}, indent=2, default=str),
    )
    return {"summary": summary, "runs": runs}


def _run(cfg: RunConfig) -> dict[str, Any]:
    """A finished run is reused; an unfinished one starts again."""
    done = Path(cfg.output_dir) / METRICS_FILE
    if done.is_file():
        return json.loads(done.read_text())
    return train(dataclasses.replace(cfg, resume=False, overwrite=True))


def _validation_score(cfg: RunConfig, init: str, seed: int, lr: float, root: Path) -> float:
    """Main metric on held-out training rows of one ``init`` run at ``lr`` (never the test set)."""
    from ..tasks import get_task

    fraction = cfg.validation or DEFAULT_VALIDATION
    out = root / init / f"select-lr{lr:g}"
    metrics = _run(
        dataclasses.replace(
            cfg, init=init, seed=seed, learning_rate=lr, validation=fraction, output_dir=str(out)
        )
    )
    return float(metrics["eval"]["validation"][get_task(cfg.task).main_metric])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[str, list[dict[str, Any]]], task: str) -> list[dict[str, Any]]:
    rows = []
    for name, results in runs.items():
        metric, _ = headline(results[0], task)
        score = _mean_std([headline(r, task)[1] for r in results])
        loss = _mean_std([r["train_loss"] for r in results])
        init = _mean_std([r["init_seconds"] for r in results])
        rows.append(
            {
                "init": name,
                "seeds": len(results),
                "metric": metric,
                "mean": score[0],
                "std": score[1],
                "train_loss_mean": loss[0],
                "train_loss_std": loss[1],
                "init_seconds_mean": init[0],
            }
        )
    return rows


def to_markdown(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| init | seeds | metric | mean +/- std | train loss | init s | learning rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        picked = r.get("validation_scores") or {}
        rate = f"{r.get('learning_rate', 0):g}" + (
            " (chosen on validation: "
            + ", ".join(f"{k}: {100 * v:.2f}" for k, v in picked.items())
            + ")"
            if picked
            else ""
        )
        lines.append(
            f"| {r['init']} | {r['seeds']} | {r['metric']} | {100 * r['mean']:.2f} +/- "
            f"{100 * r['std']:.2f} "
            f"| {r['train_loss_mean']:.4f} +/- {r['train_loss_std']:.4f} | "
            f"{r['init_seconds_mean']:.2f} "
            f"| {rate} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(summary: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    rows = [{k: v for k, v in r.items() if k != "validation_scores"} for r in summary]
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
