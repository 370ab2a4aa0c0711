"""What the rate-sweep grids share (``math_sweep.py``, ``glue_sweep.py``): runs kept as small
JSON so a grid resumes across sittings and checkouts, the EVA state reused across rates, the
sitting's bounds, and the choice rule fixed in their plans.

Why: at one shared rate a comparison of initialisations favours whichever method that rate suits;
tuned per method, LoRA initialisations often land within 1-2 % of each other ("Learning Rate
Matters", arXiv 2602.04998). So each grid first *selects* every method's rate (and EVA's rho) on
rows held out of the training data, then *tests* each method at its choice over seeds.

A finished run leaves ``<runs>/<name>.json``: its settings (everything the run depends on), the
scores and per-item predictions its script keeps, the loss log, and the commit and package modules
that made it. A run whose file is there with the same settings is read back, never trained again,
unless the code it loaded has changed since it was made and ``--rerun-stale`` asks for runs of
today's code (without it such a run is read back, said so, and the result stays stale: its commit
is its oldest run's). The adapters go to ``--work`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plans
from common import code_files, made_by_runs, provenance_at_start, write_results

from eva_lora.app.recipes.train import train
from eva_lora.app.run_config import build_run_config
from eva_lora.files import atomic_write_text
from eva_lora.state import STATE_DIR

# (settings, run folder, the recipe's metrics) -> the fields of the run's record its script keeps
Describe = Callable[[dict[str, Any], Path, dict[str, Any]], dict[str, Any]]


def add_sitting_args(
    parser: argparse.ArgumentParser, runs_default: Path, work_default: Path
) -> None:
    """--runs, --work and the bounds of one sitting (--max-minutes, --max-new-runs)."""
    parser.add_argument(
        "--runs", type=Path, default=None, help=f"finished runs' records (default {runs_default})"
    )
    parser.add_argument("--work", type=Path, default=work_default, help="adapters")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new run after this many minutes (the grid continues in the next sitting)",
    )
    parser.add_argument(
        "--max-new-runs", type=int, default=None, help="train at most this many new runs"
    )
    parser.add_argument(
        "--rerun-stale",
        action="store_true",
        help="train again the runs made by code that has changed since (report.py would mark "
        "the result stale); without it they are read back (counted towards --max-new-runs "
        "when retrained)",
    )


class Grid:
    """A plan's runs, read back or trained in order, within this sitting's bounds.

    ``describe`` turns a finished run into the fields its script keeps (scores, per-item
    predictions); the grid adds what every run records (timings, commit, modules)."""

    def __init__(self, args: argparse.Namespace, describe: Describe) -> None:
        self.args, self.describe = args, describe
        self.started = time.perf_counter()
        self.trained = 0  # runs trained in this sitting (bounded by --max-new-runs)
        self.made: list[dict[str, Any]] = []  # each run's record: commit and modules
        self.states: dict[str, Path] = {}  # settings but the rate -> an EVA state computed here
        self.stale_reused = 0  # runs read back although the code they loaded changed since
        self._freshness: dict[tuple, bool] = {}

    def run(self, settings: dict[str, Any], name: str, shown: str) -> dict[str, Any] | None:
        """The run's record: read back, or trained now, or None (this sitting's bounds reached).

        ``shown``: the record's field the log prints (its score)."""
        file = self.args.runs / f"{name}.json"
        if file.is_file():
            found = json.loads(file.read_text())
            stale = found.get("settings") == settings and self.stale(found)
            if found.get("settings") == settings and not (stale and self.args.rerun_stale):
                self.made.append(found)
                self.stale_reused += stale
                note = "reused, made by code that changed since" if stale else "reused"
                self.log(f"{name}: {shown} {found[shown]:.4f} ({note})")
                return found
        if self.out_of_time():
            return None
        record = self._train(settings, name)
        self.args.runs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(record))
        self.trained += 1
        self.made.append(record)
        self.log(
            f"{name}: {shown} {record[shown]:.4f} ({record['seconds']:.0f} s; "
            f"{time.perf_counter() - self.started:.0f} s so far)"
        )
        return record

    def _train(self, settings: dict[str, Any], name: str) -> dict[str, Any]:
        out = self.args.work / name
        # the EVA state depends on the data, seed and EVA settings, never on the rate
        but_rate = {k: v for k, v in settings.items() if k != "learning_rate"}
        key = json.dumps(but_rate, sort_keys=True)
        reuse = self.states.get(key) if settings["init"].startswith("eva") else None
        cfg = build_run_config(
            overrides={
                **settings,
                "data_dir": str(self.args.data_dir),
                "output_dir": str(out),
                "overwrite": True,
                "progress": False,
                **({"eva_state": str(reuse)} if reuse else {}),
            }
        )
        begun = time.perf_counter()
        metrics = train(cfg)
        if (out / STATE_DIR).is_dir():
            self.states.setdefault(key, out / STATE_DIR)
        return {
            "settings": settings,
            **self.describe(settings, out, metrics),
            "train_loss": metrics["train_loss"],
            "loss": [e["loss"] for e in metrics["log"] if "loss" in e],
            "grad_norm": [e["grad_norm"] for e in metrics["log"] if "grad_norm" in e],
            "init_seconds": metrics["init_seconds"],
            "eva_state_reused": reuse is not None,
            "eva_batches": (metrics.get("eva") or {}).get("n_batches"),
            "train_seconds": metrics["train_seconds"],
            "eval_seconds": metrics.get("eval_seconds"),
            "seconds": round(time.perf_counter() - begun, 1),
            "git_commit": provenance_at_start()["git_commit"],
            "code_files": code_files(),
        }

    def stale(self, found: dict[str, Any]) -> bool:
        """Whether the code a stored run loaded has changed since its commit (report.py's rule)."""
        from report import freshness

        key = (found.get("git_commit"), tuple(found.get("code_files") or ()))
        if key not in self._freshness:
            made = {"git_commit": key[0], "code_files": list(key[1])}
            self._freshness[key] = freshness({"provenance": made}).startswith("stale")
        return self._freshness[key]

    def out_of_time(self) -> bool:
        args = self.args
        if args.max_new_runs is not None and self.trained >= args.max_new_runs:
            return True
        minutes = (time.perf_counter() - self.started) / 60
        return args.max_minutes is not None and minutes >= args.max_minutes

    @staticmethod
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def choose(scores: dict[tuple[str, float], float], variants: list[str]) -> tuple[str, float]:
    """(variant, rate) with the best validation score; a tie goes to the smaller rate, then to
    the variant listed first (the plans' rule, fixed before the results)."""
    return min(scores, key=lambda k: (-scores[k], k[1], variants.index(k[0])))


def cell(variant: str, rate: float) -> str:
    """A selection cell's name in the results: the rate, with the variant when there are several."""
    return f"{rate:g}" if variant == "-" else f"{variant} {rate:g}"


def run_name(label: str, variant: str, rate: float, seed: int, phase: str, task: str = "") -> str:
    tag = "" if variant == "-" else "_" + variant.replace("=", "")
    return f"{phase}_{task + '_' if task else ''}{label}{tag}_lr{rate:g}_seed{seed}"


def finish(
    args: argparse.Namespace,
    grid: Grid,
    experiment: str,
    record: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Stamp the record with its plan, say how far the grid got and write the results (JSON and
    markdown, with the commit of the oldest run and the modules the runs loaded); nothing is
    written before the first run has finished."""
    if not args.quick:
        record["plan"] = plans.stamp(experiment)
    # what the runs cost when they were trained: a sitting that reads them all back takes seconds
    record["run_seconds"] = round(sum(made.get("seconds") or 0.0 for made in grid.made), 1)
    finished, planned = record["runs_finished"], record["runs_planned"]
    if grid.stale_reused:
        grid.log(
            f"{grid.stale_reused} run(s) read back were made by code that has changed since: the "
            "result is stale; --rerun-stale trains them again"
        )
    if not finished:
        grid.log("no run finished yet: nothing to write")
        return record
    if not record["complete"]:
        grid.log(
            f"{finished} of {planned} runs finished ({planned - finished} left, "
            f"{grid.trained} trained in this sitting): run the same command again to continue"
        )
    write_results(args.out, experiment, record, markdown(record), **made_by_runs(grid.made))
    return record


def not_finished(record: dict[str, Any]) -> tuple[str, str] | None:
    """The verdict of a grid that is not complete yet ("not run yet", how far it got), else None."""
    if record.get("complete"):
        return None
    return (
        "not run yet",
        f"{record['runs_finished']} of {record['runs_planned']} planned runs finished "
        "(the grid resumes in a later sitting)",
    )
