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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import plans
from common import (
    RESULTS,
    code_files,
    made_by_runs,
    provenance_at_start,
    write_results,
)
from item_tests import ALPHA, accuracy, holm, paired_bootstrap
from item_tests import verdict as item_verdict

from eva_lora.app.recipes.train import PREDICTIONS_FILE, train
from eva_lora.app.run_config import build_run_config
from eva_lora.files import atomic_write_text
from eva_lora.state import STATE_DIR

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_DATA = REPO / "tests" / "assets" / "data"
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
    parser.add_argument(
        "--runs", type=Path, default=None, help=f"finished runs' records (default {RUNS})"
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "out" / "paper_check" / EXPERIMENT, help="adapters"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"default {SHARED_DATA} (--quick: test slices)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new run after this many minutes (the grid continues in the next sitting)",
    )
    parser.add_argument(
        "--max-new-runs", type=int, default=None, help="train at most this many new runs"
    )
    args = parser.parse_args(argv)
    if args.quick and not args.model:
        parser.error("--quick needs --model (a tiny local causal LM folder)")
    if args.data_dir is None:
        args.data_dir = TEST_DATA if args.quick else SHARED_DATA
    if not (args.data_dir / "gsm8k").is_dir():
        parser.error(f"no gsm8k/ folder under --data-dir {args.data_dir}")
    if args.runs is None:
        args.runs = args.work / "runs" if args.quick else RUNS
    return args


def load_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {**QUICK_PLAN, "model": args.model}
    return plans.load(EXPERIMENT)


class Grid:
    """The plan's runs, read back or trained in order, within this sitting's bounds."""

    def __init__(self, args: argparse.Namespace, plan: dict[str, Any]) -> None:
        self.args, self.plan = args, plan
        self.started = time.perf_counter()
        self.trained = self.missing = 0
        self.made: list[dict[str, Any]] = []  # each run's commit and modules
        self.states: dict[tuple[str, int], Path] = {}  # (variant key, seed) -> an EVA state

    def settings(
        self, method: dict[str, Any], variant: str, rate: float, seed: int, phase: str
    ) -> dict[str, Any]:
        """Everything a run depends on (what its record must match to be reused)."""
        recipe, selection = self.plan["recipe"], self.plan["selection"]
        validating = phase == "select"
        return {
            **{k: v for k, v in recipe.items() if k != "eva"},
            "model": self.plan["model"],
            "task": self.plan["task"],
            "init": method["init"],
            "seed": seed,
            "learning_rate": rate,
            "validation": selection["validation"] if validating else 0.0,
            "eval_limit": selection["validation_questions"]
            if validating
            else self.plan["test_questions"],
            "eva": {**recipe.get("eva", {}), **method["variants"][variant]},
        }

    def name(self, method: dict[str, Any], variant: str, rate: float, seed: int, phase: str) -> str:
        tag = "" if variant == "-" else "_" + variant.replace("=", "")
        return f"{phase}_{method['label']}{tag}_lr{rate:g}_seed{seed}"

    def run(
        self, method: dict[str, Any], variant: str, rate: float, seed: int, phase: str
    ) -> dict[str, Any] | None:
        """The run's record: read back, or trained now, or None (this sitting's bounds reached)."""
        settings = self.settings(method, variant, rate, seed, phase)
        name = self.name(method, variant, rate, seed, phase)
        file = self.args.runs / f"{name}.json"
        if file.is_file():
            found = json.loads(file.read_text())
            if found.get("settings") == settings:
                self._keep(found)
                self._log(f"{name}: accuracy {found['accuracy']:.4f} (reused)")
                return found
        if self._out_of_time():
            self.missing += 1
            return None
        record = self._train(method, variant, seed, settings, name)
        atomic_write_text(file, json.dumps(record))  # the runs folder exists: _train made it
        self.trained += 1
        self._keep(record)
        self._log(
            f"{name}: accuracy {record['accuracy']:.4f} ({record['seconds']:.0f} s; "
            f"{time.perf_counter() - self.started:.0f} s so far)"
        )
        return record

    def _train(
        self, method: dict[str, Any], variant: str, seed: int, settings: dict[str, Any], name: str
    ) -> dict[str, Any]:
        out = self.args.work / name
        key = (f"{method['label']}{variant}:{settings['validation']}", seed)
        reuse = self.states.get(key) if method["init"].startswith("eva") else None
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
        where = "validation" if settings["validation"] else settings["task"]
        items = json.loads((out / PREDICTIONS_FILE).read_text())[where]
        self.args.runs.mkdir(parents=True, exist_ok=True)
        return {
            "settings": settings,
            "accuracy": metrics["eval"][where]["accuracy"],
            "correct": items["correct"],
            "predictions": items["prediction"],
            "train_loss": metrics["train_loss"],
            "loss": [e["loss"] for e in metrics["log"]],
            "grad_norm": [e["grad_norm"] for e in metrics["log"]],
            "init_seconds": metrics["init_seconds"],
            "eva_state_reused": reuse is not None,
            "eva_batches": (metrics.get("eva") or {}).get("n_batches"),
            "train_seconds": metrics["train_seconds"],
            "eval_seconds": metrics.get("eval_seconds"),
            "seconds": round(time.perf_counter() - begun, 1),
            "git_commit": provenance_at_start()["git_commit"],
            "code_files": code_files(),
        }

    def _keep(self, record: dict[str, Any]) -> None:
        self.made.append(record)

    def _out_of_time(self) -> bool:
        args = self.args
        if args.max_new_runs is not None and self.trained >= args.max_new_runs:
            return True
        minutes = (time.perf_counter() - self.started) / 60
        return args.max_minutes is not None and minutes >= args.max_minutes

    @staticmethod
    def _log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def choose(scores: dict[tuple[str, float], float], variants: list[str]) -> tuple[str, float]:
    """(variant, rate) with the best validation accuracy; a tie goes to the smaller rate, then to
    the variant listed first (the plan's rule, fixed before the results)."""
    return min(scores, key=lambda k: (-scores[k], k[1], variants.index(k[0])))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = load_plan(args)
    grid = Grid(args, plan)
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
                found = grid.run(method, variant, rate, seed0, "select")
                if found is not None:
                    scores[(variant, rate)] = found["accuracy"]
                    selection.setdefault(label, {})[_cell(variant, rate)] = found["accuracy"]
        if len(scores) < len(variants) * len(plan["learning_rates"]):
            continue
        variant, rate = choose(scores, variants)
        chosen[label] = {"variant": variant, "learning_rate": rate}
    for method in plan["methods"]:
        label = method["label"]
        if label not in chosen:
            continue
        for seed in plan["seeds"]:
            found = grid.run(
                method, chosen[label]["variant"], chosen[label]["learning_rate"], seed, "test"
            )
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
    if not args.quick:
        record["plan"] = plans.stamp(EXPERIMENT)
    if not finished:
        grid._log("no run finished yet: nothing to write")
        return record
    if not record["complete"]:
        grid._log(
            f"{finished} of {planned} runs finished ({planned - finished} left, "
            f"{grid.trained} trained in this sitting): run the same command again to continue"
        )
    write_results(
        args.out,
        EXPERIMENT,
        record,
        markdown(record),
        **made_by_runs(grid.made),
    )
    return record


def _cell(variant: str, rate: float) -> str:
    return f"{rate:g}" if variant == "-" else f"{variant} {rate:g}"


def _short(record: dict[str, Any]) -> dict[str, Any]:
    """What the results file keeps of a test run (the runs folder keeps the rest)."""
    keep = ("accuracy", "correct", "train_loss", "init_seconds", "eva_batches", "train_seconds")
    return {k: record[k] for k in keep}


def verdict(record: dict[str, Any]) -> tuple[str, str]:
    """The plan's test: for each comparison "EVA at least as accurate as B", a paired bootstrap over
    seeds and test questions of the accuracy difference, Holm over the comparisons."""
    if not record.get("complete"):
        return (
            "not run yet",
            f"{record['runs_finished']} of {record['runs_planned']} planned runs finished "
            "(the grid resumes in a later sitting)",
        )
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
        f"runs finished; {record['seconds']} s in the last sitting, finished runs are read back). "
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
                cell = _cell(variant, rate)
                if cell not in scores:
                    cells.append("-")
                    continue
                pick = record["chosen"].get(label)
                bold = pick and pick["variant"] == variant and pick["learning_rate"] == rate
                cells.append(
                    f"**{100 * scores[cell]:.2f}**" if bold else f"{100 * scores[cell]:.2f}"
                )
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
