"""Paper Tables 3 (math), 2 (common sense) and Figure 2 on a pretrained causal LM (SmolLM2-135M).

    # Table 3 analogue (+ Figure 2)
    python benchmarks/paper_check/lm_generation.py --part math
    # Table 2 analogue (+ Figure 2)
    python benchmarks/paper_check/lm_generation.py --part commonsense
    # code: LoRA vs EVA, HumanEval + MBPP pass@1
    python benchmarks/paper_check/lm_generation.py --part code
    # math + common sense, tiny, test slices (CI)
    python benchmarks/paper_check/lm_generation.py --quick

The paper's language-generation recipe (``../shared/PAPER.md``): adapters on every linear layer
including the LM head, r 16, alpha 1, AdamW with weight decay 0, lr 5e-4, linear schedule, warm-up
0.03, greedy decoding, the paper's prompt templates, only the response trained. Methods: LoRA, EVA
(rho 1 and 2), PiSSA, OLoRA, DoRA and EVA+DoRA (rho 2), 3 seeds each. Sized to 2 CPU cores (the
choices are in ``PARTS``): SmolLM2-135M-Instruct (Q4_1 weights in float32) instead of Llama-2-7B;
a few dozen optimiser steps of batch 4 instead of an epoch of batch 32; SVD batch size 4 instead
of 16 (the paper shows batch 4 converging fastest); max length 256 (math) / 192 (common sense) with
over-long examples dropped; a fixed subset of the test questions, the same for every run.
Common sense: the label mask is off for EVA (one-word answers; the paper found it hurts there).
Code (the paper's Code-Feedback setting, offline: MBPP's train split as conversations, see the
``code`` preset): LoRA vs EVA only, conversations truncated at 384 tokens (the paper: 2048), batch
2 x 2, 20 steps, a fixed 20-problem subset of HumanEval and of MBPP's test split, up to 160 new
tokens, pass@1 of greedy answers executed in the sandbox; the label mask is on (only assistant
tokens enter EVA and the loss). Measured cost on 2 cores: a math run takes 9 min with LoRA
(40 steps ~320 s, 60 answers of up to 200 tokens ~230 s) and ~15 min with EVA (its init needs
~95 batches of 4 to converge at tau 0.99: ~240 s); a code run 7 min (LoRA) to 12 min (EVA). Run
``--max-new-runs N`` per sitting.

Figure 2's claim (lower loss and a larger gradient norm early for EVA than for LoRA, PiSSA and
OLoRA) is read from the same runs' per-step logs: unlike MiniLM's classifier, no head is trained in
full here, so the gradient norm is the adapters'.

Each run is the ``eva train`` recipe into ``--work`` (adapter, metrics: not committed). What the
results need of a finished run (its scores, the first steps' loss and gradient norm, its settings
and the commit and modules that made it) is also kept in ``--runs``, one small JSON per run,
committed as the runs come in: the grid takes ~6 hours on 2 cores, more than one sitting, and a
fresh checkout has no ``--work``. A run found in either place with the same settings is read back,
not trained again. Results: ``lm_generation.{json,md,png}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS,
    made_by,
    made_by_runs,
    pyplot,
    record_made_by,
    save_png,
    write_results,
)

from eva_lora.app.recipes.compare import headline
from eva_lora.app.recipes.run_folder import same_settings, shaping_settings
from eva_lora.app.recipes.train import METRICS_FILE, train
from eva_lora.app.run_config import RunConfig, build_run_config
from eva_lora.files import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
RUNS = Path(__file__).resolve().parent / "runs" / "lm_generation"
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_DATA = REPO / "tests" / "assets" / "data"

METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("LoRA", "lora", {}),
    ("EVA rho=1", "eva", {"rho": 1.0}),
    ("EVA rho=2", "eva", {"rho": 2.0}),
    ("PiSSA", "pissa", {}),
    ("OLoRA", "olora", {}),
    ("DoRA", "dora", {}),
    ("EVA+DoRA rho=2", "eva-dora", {"rho": 2.0}),
]
RECIPE = dict(
    model="smollm2",
    rank=16,
    lora_alpha=1.0,
    lora_dropout=0.0,
    weight_decay=0.0,
    learning_rate=5e-4,
    scheduler="linear",
    warmup_ratio=0.03,
    batch_size=4,
    grad_accum=1,
    svd_batch_size=4,
    drop_long=True,
    logging_steps=1,
    eval_batch_size=16,
)
PARTS: dict[str, dict[str, Any]] = {
    "math": dict(
        task="gsm8k",
        max_length=256,
        max_steps=40,
        train_limit=2000,
        eval_limit=60,
        max_new_tokens=200,
        eva={"target_modules": "all-linear-and-head"},
    ),
    "commonsense": dict(
        task="commonsense",
        max_length=192,
        max_steps=40,
        train_limit=2000,
        eval_limit=30,
        max_new_tokens=16,
        eva={"target_modules": "all-linear-and-head", "use_label_mask": False},
    ),
    "code": dict(
        task="code",
        max_length=384,
        drop_long=False,
        max_steps=20,
        batch_size=2,
        grad_accum=2,
        eval_limit=20,
        max_new_tokens=160,
        eval_batch_size=10,
        eva={"target_modules": "all-linear-and-head", "use_label_mask": True},
    ),
}
PART_METHODS = {"code": ("LoRA", "EVA rho=2")}  # the comparison
# read the bundled copies of HumanEval / MBPP (the same files as ../shared/data/code)
BUNDLED_PARTS = {"code"}
QUICK = dict(
    model=None, max_steps=3, train_limit=16, eval_limit=2, max_new_tokens=8, logging_steps=1
)
# Figure 2 reads the first steps; the verdict uses steps 1-5 (grad norm) and 6-20 (loss)
FIGURE2_STEPS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", default="all", help="math, commonsense, code, a comma-separated list, or all"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny form on the test slices (CI); --model must be given",
    )
    parser.add_argument("--model", default=None, help="model for --quick (a tiny local causal LM)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"default {SHARED_DATA} (--quick: test slices)"
    )
    parser.add_argument("--work", type=Path, default=REPO / "out" / "paper_check" / "lm_generation")
    parser.add_argument(
        "--runs",
        type=Path,
        default=None,
        help=f"one JSON per finished run, to commit (default {RUNS.relative_to(REPO)}; --quick: "
        "WORK/records)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the methods "
        "(default: all; the grid fills in over sittings)",
    )
    parser.add_argument(
        "--max-new-runs",
        type=int,
        default=None,
        help="train at most this many new runs in this sitting (seed by seed), then report all",
    )
    args = parser.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = TEST_DATA if args.quick else SHARED_DATA
    if args.quick and not args.model:
        parser.error("--quick needs --model (a tiny local causal LM folder)")
    if args.runs is None:
        args.runs = args.work / "records" if args.quick else RUNS
    return args


def run_path(root: Path, part: str, label: str, seed: int) -> Path:
    """A run's place under ``root``: its folder under ``--work``, with ``.json`` its record under
    ``--runs`` (:func:`keep`)."""
    return root / part / label.replace(" ", "_").replace("+", "-") / f"seed{seed}"


def portable_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that shape a run, with the data folder relative to the repository: a record
    committed in one checkout must match the same run in a checkout elsewhere (an absolute path
    would make every record look like another run's, and the grid train them all again)."""
    settings = shaping_settings(cfg)
    if settings.get("data_dir"):
        where = os.path.relpath(Path(settings["data_dir"]).resolve(), REPO)
        settings["data_dir"] = Path(where).as_posix()
    return settings


def keep(file: Path, cfg: RunConfig, result: dict[str, Any], made: dict[str, Any]) -> None:
    """Keep what the results need of a finished run, with its settings and what made it. The
    record holds :func:`_result`'s fields as computed then: a change to what that keeps (say
    ``FIGURE2_STEPS``) reaches a recorded run only when it is trained again."""
    file.parent.mkdir(parents=True, exist_ok=True)
    record = {"config": portable_settings(cfg), "result": result, "made_by": made}
    atomic_write_text(file, json.dumps(record, indent=1) + "\n")


def finished(cfg: RunConfig, file: Path, seed: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(result, what made it) of a finished run with exactly these settings, or None.

    Read from the run's record (``file``) first, else from its run folder, whose result is then
    recorded too (a grid begun before the records existed keeps its runs). A run that does not say
    what made it (``common.record_made_by``) counts as unfinished."""
    if file.is_file():
        record = json.loads(file.read_text())
        if record["config"] == portable_settings(cfg) and record.get("made_by"):
            return record["result"], record["made_by"]
    done = Path(cfg.output_dir) / METRICS_FILE
    made = made_by(Path(cfg.output_dir)) if done.is_file() else None
    if made is not None:
        metrics = json.loads(done.read_text())
        if same_settings(metrics.get("config") or {}, cfg):
            result = _result(metrics, cfg.task, seed)
            keep(file, cfg, result, made)
            return result, made
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read back) the grid. ``--part`` and ``--methods`` choose what may be *trained*;
    finished runs of the other parts and methods with the same settings are read back and reported
    too, and the results are rewritten after every run, so a grid filled in over several sittings is
    never lost and always reported whole."""
    args = parse_args(argv)
    every_part = ["math", "commonsense"] + ([] if args.quick else ["code"])
    parts = (
        every_part
        if args.part == "all"
        else list(dict.fromkeys(p.strip() for p in args.part.split(",")))
    )
    if not set(parts) <= set(PARTS):
        raise SystemExit(
            f"--part: unknown part(s) {sorted(set(parts) - set(PARTS))}; choose from {list(PARTS)} "
            "or all"
        )
    quick_methods = [m for m in METHODS if m[0] in ("LoRA", "EVA rho=2")]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    started, runs, done = time.perf_counter(), {}, 0
    chosen = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    unknown = sorted(set(chosen or []) - {m[0] for m in METHODS})
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {[m[0] for m in METHODS]}")
    # the chosen parts first; the others read back
    reported = parts + [p for p in every_part if p not in parts]
    part_methods = {
        p: quick_methods
        if args.quick
        else [m for m in METHODS if m[0] in PART_METHODS.get(p, m[0])]
        for p in reported
    }
    plan = []  # (part, label, seed, cfg, may_train)
    for part in reported:
        quick = {k: v for k, v in QUICK.items() if v is not None} if args.quick else {}
        settings = {**RECIPE, **PARTS[part], **quick}
        if args.quick:
            settings["model"] = args.model
        for seed in seeds:  # seed-major: a sitting cut short leaves complete, paired seeds
            for label, init, eva in part_methods[part]:
                out = run_path(args.work, part, label, seed)
                cfg = build_run_config(
                    overrides={
                        **settings,
                        "init": init,
                        "seed": seed,
                        "output_dir": str(out),
                        # an unfinished run starts again
                        "overwrite": True,
                        "data_dir": None if part in BUNDLED_PARTS else str(args.data_dir),
                        "progress": False,
                        "eva": {**settings["eva"], **eva},
                    }
                )
                plan.append(
                    (part, label, seed, cfg, part in parts and (chosen is None or label in chosen))
                )
    total = sum(1 for *_, may_train in plan if may_train)
    # Every finished run is read first, so that the results
    # written after each new run hold the whole grid.
    files = [
        run_path(args.runs, p, label, seed).with_suffix(".json") for p, label, seed, *_ in plan
    ]
    found = [finished(cfg, file, seed) for (_, _, seed, cfg, _), file in zip(plan, files)]
    made: dict[str, dict[str, Any]] = {}  # run folder -> what made it
    for (part, label, _, cfg, _), hit in zip(plan, found):
        if hit is not None:
            runs.setdefault(part, {}).setdefault(label, []).append(hit[0])
            made[cfg.output_dir] = hit[1]
    trained = 0
    for (part, label, seed, cfg, may_train), hit, file in zip(plan, found, files):
        if not may_train:  # only read back (above): a part or method this sitting may not train
            continue
        if hit is None and args.max_new_runs is not None and trained >= args.max_new_runs:
            print(
                f"skipped {part} {label} seed {seed}: --max-new-runs {args.max_new_runs} reached",
                file=sys.stderr,
                flush=True,
            )
            continue
        begun, reused = time.perf_counter(), hit is not None
        if hit is None:
            metrics = train(cfg)
            made[cfg.output_dir] = record_made_by(Path(cfg.output_dir))
            result = _result(metrics, cfg.task, seed)
            keep(file, cfg, result, made[cfg.output_dir])
            runs.setdefault(part, {}).setdefault(label, []).append(result)
        else:
            result = hit[0]
        done += 1
        print(
            f"[{done}/{total}] {part} {label} seed {seed}: {result['metric']} "
            f"{result['score']:.4f}, train loss {result['train_loss']:.4f} "
            f"({'reused' if reused else f'{time.perf_counter() - begun:.0f} s'}, "
            f"{time.perf_counter() - started:.0f} s so far)",
            file=sys.stderr,
            flush=True,
        )
        if not reused:
            trained += 1
            _write(args, reported, seeds, runs, made, len(plan), started, final=False)
    return _write(args, reported, seeds, runs, made, len(plan), started, final=True)


def _write(
    args: argparse.Namespace,
    parts: list[str],
    seeds: list[int],
    runs: dict[str, Any],
    made: dict[str, dict[str, Any]],
    planned: int,
    started: float,
    final: bool,
) -> dict[str, Any]:
    """Results of every run found so far, in the grid's order (method, then seed), stamped with
    the oldest commit and the united modules of the processes that made them, and with how many
    of the grid's runs they are (a grid filled in over sittings is reported before it is whole)."""
    order = {label: i for i, (label, _, _) in enumerate(METHODS)}
    ordered = {
        p: {
            m: sorted(runs[p][m], key=lambda r: r["seed"])
            for m in sorted(runs[p], key=order.__getitem__)
        }
        # the grid's order, whatever order this sitting trained in
        for p in PARTS
        if p in runs
    }
    record = {
        "quick": args.quick,
        "parts": list(ordered),
        "seeds": seeds,
        "settings": {p: {**RECIPE, **PARTS[p]} for p in ordered},
        "runs": ordered,
        "runs_finished": len(made),
        "runs_planned": planned,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if final:
        plot(record, args.out / "lm_generation.png")
    write_results(
        args.out,
        "lm_generation",
        record,
        markdown(record),
        **made_by_runs(list(made.values())),
    )
    return record


def _result(metrics: dict[str, Any], task: str, seed: int) -> dict[str, Any]:
    metric, score = headline(metrics, task)
    per_task = {
        k: v["pass@1" if "pass@1" in v else "accuracy"]
        for k, v in metrics["eval"].items()
        if isinstance(v, dict)
    }
    log = metrics["log"]
    return {
        "seed": seed,
        "metric": metric,
        "score": score,
        "per_task": per_task,
        "train_loss": metrics["train_loss"],
        "loss": [e["loss"] for e in log][:FIGURE2_STEPS],
        "grad_norm": [e["grad_norm"] for e in log][:FIGURE2_STEPS],
        "init_seconds": metrics["init_seconds"],
        "train_seconds": metrics["train_seconds"],
        "eval_seconds": metrics.get("eval_seconds"),
        "eva_batches": (metrics.get("eva") or {}).get("n_batches"),
    }


def _progress(record: dict[str, Any]) -> str:
    """ "12 of 45 runs finished, not yet the whole grid; " while a grid is filled in (nothing for a
    result from before the count was recorded, or a whole grid)."""
    done, planned = record.get("runs_finished"), record.get("runs_planned")
    if done is None or planned is None or done >= planned:
        return ""
    return f"{done} of {planned} runs finished, not yet the whole grid; "


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} +/- {100 * spread:.2f}"


def _window_mean(results: list[dict[str, Any]], key: str, start: int, stop: int) -> str:
    """Mean over seeds of per-step values in [start, stop); "-" when runs are shorter (--quick)."""
    windows = [r[key][start:stop] for r in results]
    if not all(windows):
        return "-"
    return f"{statistics.fmean(statistics.fmean(w) for w in windows):.4f}"


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "## Tables 2 / 3 and Figure 2 analogues (and code): SmolLM2-135M on math, common sense, "
        "code",
        "",
        f"`python benchmarks/paper_check/lm_generation.py{' --quick' if record['quick'] else ''}` "
        f"({_progress(record)}{record['seconds']} s in this sitting; finished runs are reused). "
        "SmolLM2-135M-Instruct "
        "(Q4_1 weights in float32), adapters on every linear layer and the LM head, r 16, "
        "alpha 1, lr 5e-4, linear schedule, warm-up 0.03, batch 4, SVD batch size 4, seeds "
        f"{record['seeds']}; scores x 100, mean +/- std over seeds.",
        "",
    ]
    for part in record["runs"]:  # a part with no finished run yet is left out
        s, runs = record["settings"][part], record["runs"][part]
        tasks = list(next(iter(runs.values()))[0]["per_task"])
        long = "longer dropped" if s["drop_long"] else "longer truncated"
        lines += [
            f"### {part}: {s['max_steps']} steps, max length {s['max_length']} ({long}), "
            f"{s['eval_limit']} test questions per task, up to {s['max_new_tokens']} new tokens"
            + (" (scores: pass@1)" if part == "code" else ""),
            "",
            "| method | seeds | "
            + " | ".join(tasks)
            + (" | mean |" if len(tasks) > 1 else " |")
            + " train loss | loss steps 6-20 | grad norm steps 1-5 | init s |",
            "|---" * (len(tasks) + (2 if len(tasks) > 1 else 1) + 5) + "|",
        ]
        for label, results in runs.items():
            cells = [_mean_std([r["per_task"][t] for r in results]) for t in tasks]
            if len(tasks) > 1:
                cells.append(_mean_std([r["score"] for r in results]))
            early = _window_mean(results, "loss", 5, FIGURE2_STEPS)
            grad = _window_mean(results, "grad_norm", 0, 5)
            loss = statistics.fmean(r["train_loss"] for r in results)
            init = statistics.fmean(r["init_seconds"] for r in results)
            tail = f" | {loss:.4f} | {early} | {grad} | {init:.1f} |"
            seeds = ",".join(str(r["seed"]) for r in results)
            lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + tail)
        lines.append("")
    lines += ["![loss and gradient norm over the first steps](results/lm_generation.png)", ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Figure 2 analogue: loss and gradient norm per step, mean over seeds, for each part."""
    parts = list(record["runs"])
    if not parts:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(parts), 2, figsize=(10, 3.2 * len(parts)), squeeze=False)
    for row, part in zip(axes, parts):
        for label, results in record["runs"][part].items():
            steps = range(1, min(len(r["loss"]) for r in results) + 1)
            for ax, key in zip(row, ("loss", "grad_norm")):
                ax.plot(
                    steps,
                    [statistics.fmean(r[key][i - 1] for r in results) for i in steps],
                    label=label,
                )
        row[0].set(title=f"{part}: training loss", xlabel="step")
        row[1].set(title=f"{part}: gradient norm", xlabel="step")
    axes[0][0].legend(fontsize=7)
    save_png(fig, path)


if __name__ == "__main__":
    main()
