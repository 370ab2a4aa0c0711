"""Decision making (paper Section "Decision making", Meta-World) at small scale: EVA vs LoRA on a
Decision Transformer pre-trained on some Meta-World tasks and fine-tuned on each CW10 task.

    # the plan plans/decision.json: 10 CW10 tasks x (LoRA, EVA) x 3 seeds (~100 min on 2 cores)
    python benchmarks/paper_check/decision.py
    # the same grid in two processes of one thread each (~55 min on 2 cores), then assembled:
    python benchmarks/paper_check/decision.py --shard 0/2 &
    python benchmarks/paper_check/decision.py --shard 1/2
    python benchmarks/paper_check/decision.py          # reads every run back, writes the result
    python benchmarks/paper_check/decision.py --quick   # tiny data and steps, 2 seeds (< 1 min; CI)

The tasks, seeds, episodes, rate and the test are fixed in the pre-registered plan
``plans/decision.json`` (committed before its runs; the result is stamped with it, see
``plans.py``). It replaces a pilot (3 tasks picked after a seed-0 run of both methods, 10 episodes
on the same goals in every seed, one task deciding the verdict).

Needs Meta-World (``pip install 'eva-lora[decision]'``). What differs from the paper, and why:

- Data: expert demonstrations of Meta-World's scripted policies (``metaworld.policies``), 30
  episodes for each of 8 pre-training tasks that are not in CW10 (the paper pre-trains on MT40 =
  MT50 minus CW10, from its own data set, which cannot be downloaded here) and 20 for each of the
  10 CW10 tasks, all fine-tuned on as in the paper. Episodes end 10 steps after the first success
  or at 200 steps (Meta-World's are 500: after success the arm only holds still). Tasks the
  pre-trained model already solves, or that neither method learns, stay in: they add ties.
- Model: transformers' Decision Transformer, 3 layers, 4 heads, hidden 64, context 10 steps, dropout
  0.2 (paper: 4 layers, 8 heads, hidden 512, context 50). On two shared CPU cores hidden 128 /
  context 20 at batch 64 already takes ~1 s a step; this size takes ~0.06-0.09 s. Meta-World
  observations carry the previous frame, so a short context loses little. No task identifier is
  given (the goal is in the observation).
- Optimisation: AdamW, weight decay 0.01, grad clip 0.25, cosine to 1e-6 as in the paper; lr 1e-3
  (paper 1e-4) with warm-up over the first 10 % (paper 4000 steps), batch 32 (paper 128), 1500
  pre-training steps and 300 fine-tuning steps (paper: 100K): far fewer updates need a larger
  learning rate.
- Adapters: LoRA / EVA rank 8 on every block's c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, alpha 8
  (scaling 1; the paper's alpha 1 at rank 8 scales updates by 1/8, which 300 updates cannot make
  up); EVA rho 2, tau 0.99, its PCA on fine-tuning windows (64 windows a batch) with only real
  steps' tokens (three per step). One adapter per held-out task (single-task fine-tuning), adapters
  only train.
- Evaluation: 20 episodes per task and seed on goals no demonstration used, other goals in every
  seed (``MT1(task, seed=1000 + seed)``; the same for both methods within a seed), conditioned on
  the best demonstrated return; success = ``info["success"]`` at any step within 200 steps. The
  pre-trained model without fine-tuning is shown on seed 0's goals (10 episodes per task).

Verdict (the plan's test): :func:`item_tests.nested_bootstrap` of the mean success difference over
all tasks, resampling tasks, seeds within a task and episodes within a seed, so no single task can
carry it. Beside it, not deciding: McNemar on the episodes pooled, and the difference with each
task left out. Every stage (demonstrations, pre-trained model, each run) is stored in ``--work``
with the settings it depends on and reused when they match, so the grid resumes (and ``--shard``
processes share it). Results: ``decision.{json,md}``.
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
import torch
from common import (
    code_files,
    grid_parser,
    oldest_commit,
    provenance_at_start,
    united_code_files,
    write_results,
)
from item_tests import holm, mcnemar, nested_bootstrap
from item_tests import verdict as item_verdict
from verdicts import describe, no_signal, paired

from eva_lora.files import atomic_write_text

PRETRAIN_TASKS = [
    "reach-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "button-press-topdown-v3",
    "window-open-v3",
    "faucet-open-v3",
    "handle-press-v3",
]
RECIPE = dict(  # what the plan does not fix (the plan adds the tasks, seeds, episodes and rate)
    pretrain_tasks=PRETRAIN_TASKS,
    pretrain_episodes=30,
    finetune_episodes=20,
    pretrain_demo_seed=0,
    finetune_demo_seed=1,
    eval_seed=1000,
    max_steps=200,
    hold_steps=10,
    action_noise=0.0,
    hidden=64,
    layers=3,
    heads=4,
    context=10,
    dropout=0.2,
    pretrain_steps=1500,
    finetune_steps=300,
    batch_size=32,
    lr=1e-3,
    warmup_fraction=0.1,
    min_lr=1e-6,
    weight_decay=0.01,
    grad_clip=0.25,
    pretrain_seed=0,
    rank=8,
    lora_alpha=8.0,
    rho=2.0,
    tau=0.99,
    eva_batch_size=64,
    eva_max_batches=64,
    zero_shot_episodes=10,
    pretrain_eval_episodes=3,
)
# the fields of plans/decision.json that are settings of the runs
PLANNED = ("pretrain_tasks", "finetune_tasks", "eval_episodes")
QUICK = dict(
    pretrain_tasks=["reach-v3", "handle-press-v3"],
    finetune_tasks=["faucet-close-v3"],
    pretrain_episodes=2,
    finetune_episodes=2,
    max_steps=100,
    pretrain_steps=30,
    finetune_steps=10,
    eva_batch_size=32,
    eva_max_batches=8,
    eval_episodes=2,
    zero_shot_episodes=1,
    pretrain_eval_episodes=1,
    eval_max_steps=40,
    lr=1e-3,
)
QUICK_SEEDS = [0, 1]
STAGES = {  # what each stored stage depends on: it is reused only when these settings match
    "pretrain_demos": [
        "pretrain_tasks",
        "pretrain_episodes",
        "pretrain_demo_seed",
        "max_steps",
        "hold_steps",
        "action_noise",
    ],
    "finetune_demos": [
        "finetune_tasks",
        "finetune_episodes",
        "finetune_demo_seed",
        "max_steps",
        "hold_steps",
        "action_noise",
    ],
    "pretrained": [
        "pretrain_tasks",
        "pretrain_episodes",
        "pretrain_demo_seed",
        "max_steps",
        "hold_steps",
        "action_noise",
        "hidden",
        "layers",
        "heads",
        "context",
        "dropout",
        "pretrain_steps",
        "batch_size",
        "lr",
        "warmup_fraction",
        "min_lr",
        "weight_decay",
        "grad_clip",
        "pretrain_seed",
        "pretrain_eval_episodes",
        "eval_seed",
        "eval_max_steps",
    ],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = grid_parser(__doc__, "decision", "1 seed, tiny data and steps (CI)")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="K/N: run only every N-th run of the grid, starting at the K-th (N processes share "
        "--work); a shard that finds runs of other shards missing stops without writing the "
        "result, a run without --shard then reads every run back and writes it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine two threads wait on each other; "
        "one is 3-10x faster for these small matrices)",
    )
    return parser.parse_args(argv)


def settings_for(quick: bool) -> tuple[dict[str, Any], list[int]]:
    """(settings, seeds): the plan's grid on the recipe, or the CI form."""
    settings = {**RECIPE, "eval_max_steps": RECIPE["max_steps"]}
    if quick:
        return {**settings, **QUICK}, QUICK_SEEDS
    plan = plans.load("decision")
    if plan["methods"] != ["lora", "eva"] or plan["comparisons"] != [["eva", "lora"]]:
        raise ValueError("plans/decision.json does not match this script: methods lora and eva")
    planned = {key: plan[key] for key in PLANNED}
    return {**settings, **planned, "lr": plan["learning_rate"]}, plan["seeds"]


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N), with 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard {text!r}: expected K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise SystemExit(f"--shard {text!r}: needs 0 <= K < N")
    return k, n


def subset(settings: dict[str, Any], stage: str) -> dict[str, Any]:
    return {k: settings[k] for k in STAGES[stage]}


def configs(settings: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(PolicyConfig, pre-train TrainConfig, fine-tune TrainConfig, AdapterConfig) from settings."""
    from eva_lora.experiments.decision import AdapterConfig, PolicyConfig, TrainConfig

    policy = PolicyConfig(
        hidden=settings["hidden"],
        layers=settings["layers"],
        heads=settings["heads"],
        context=settings["context"],
        dropout=settings["dropout"],
    )

    def train(steps: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=settings["batch_size"],
            lr=settings["lr"],
            min_lr=settings["min_lr"],
            warmup_steps=max(1, round(settings["warmup_fraction"] * steps)),
            weight_decay=settings["weight_decay"],
            grad_clip=settings["grad_clip"],
        )

    adapters = AdapterConfig(
        rank=settings["rank"],
        lora_alpha=settings["lora_alpha"],
        rho=settings["rho"],
        tau=settings["tau"],
        eva_batch_size=settings["eva_batch_size"],
        eva_max_batches=settings["eva_max_batches"],
    )
    return policy, train(settings["pretrain_steps"]), train(settings["finetune_steps"]), adapters


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def demonstrations(
    kind: str, settings: dict[str, Any], work: Path, timings: dict[str, float]
) -> list[Any]:
    """``kind`` demonstrations ("pretrain"/"finetune"): stored if settings match, else collected."""
    from eva_lora.experiments.decision import (
        collect_demonstrations,
        load_demonstrations,
        save_demonstrations,
    )

    path, wanted = work / f"{kind}_demos.safetensors", subset(settings, f"{kind}_demos")
    if path.is_file() and path.with_suffix(".json").is_file():
        trajectories, meta = load_demonstrations(path)
        if meta.get("settings") == wanted:
            log(f"{kind} demonstrations: reused ({len(trajectories)} episodes)")
            return trajectories
    begun = time.perf_counter()
    trajectories = collect_demonstrations(
        settings[f"{kind}_tasks"],
        settings[f"{kind}_episodes"],
        settings[f"{kind}_demo_seed"],
        settings["max_steps"],
        settings["hold_steps"],
        settings["action_noise"],
    )
    seconds = time.perf_counter() - begun
    steps = sum(t.length for t in trajectories)
    timings[f"{kind}_demo_seconds"], timings[f"{kind}_demo_steps"] = round(seconds, 2), steps
    save_demonstrations(trajectories, path, {"settings": wanted, "seconds": round(seconds, 2)})
    log(
        f"{kind} demonstrations: {len(trajectories)} episodes, {steps} steps, "
        f"{sum(t.success for t in trajectories)} successful ({seconds:.0f} s)"
    )
    return trajectories


def demo_summary(trajectories: list[Any]) -> dict[str, Any]:
    tasks = sorted({t.task for t in trajectories})
    return {
        task: {
            "episodes": sum(t.task == task for t in trajectories),
            "success_rate": statistics.fmean(t.success for t in trajectories if t.task == task),
            "mean_length": round(
                statistics.fmean(t.length for t in trajectories if t.task == task), 1
            ),
            "best_return": round(max(t.episode_return for t in trajectories if t.task == task), 2),
        }
        for task in tasks
    }


def pretrained_model(
    settings: dict[str, Any], demos: list[Any], work: Path, timings: dict[str, float]
) -> tuple[Any, dict[str, Any]]:
    """The stored pre-trained policy if its settings match, else pre-trained.

    A new policy is checked on its own tasks."""
    from eva_lora.experiments.decision import (
        evaluate_success,
        load_policy,
        pretrain,
        save_policy,
        target_return,
    )

    path, wanted = work / "pretrained.safetensors", subset(settings, "pretrained")
    if path.is_file() and path.with_suffix(".json").is_file():
        model, info = load_policy(path)
        if info.get("settings") == wanted:
            log("pre-trained model: reused")
            return model, info
    policy, train, _, _ = configs(settings)
    model, info = pretrain(demos, policy, train, settings["pretrain_seed"])
    timings["pretrain_step_seconds"] = info["train_seconds"] / train.steps
    log(
        f"pre-trained: {train.steps} steps, final loss {info['losses'][-1]:.4f} "
        f"({info['train_seconds']:.0f} s)"
    )
    begun, own = time.perf_counter(), {}
    for task in settings["pretrain_tasks"]:  # does it act well on the tasks it was trained on?
        result = evaluate_success(
            model,
            task,
            settings["pretrain_eval_episodes"],
            settings["eval_seed"],
            target_return(demos, task),
            settings["eval_max_steps"],
        )
        own[task] = result["success_rate"]
    log(f"pre-trained model on its own tasks: {own} ({time.perf_counter() - begun:.0f} s)")
    info = {
        "settings": wanted,
        "losses": info["losses"],
        "train_seconds": info["train_seconds"],
        "success_on_pretrain_tasks": own,
    }
    save_policy(model, path, info)
    return model, info


def run_one(
    init: str,
    task: str,
    seed: int,
    settings: dict[str, Any],
    model: Any,
    demos: list[Any],
    work: Path,
    timings: dict[str, float],
) -> tuple[dict[str, Any], bool]:
    """A finished run with the same settings is read back (grid resume); else trained and stored."""
    from eva_lora.experiments.decision import evaluate_success, finetune, target_return

    found = stored_run(init, task, seed, settings, work)
    if found is not None:
        return found, True
    file = work / f"{init}_{task}_seed{seed}.json"
    _, _, train, adapters = configs(settings)
    data = [t for t in demos if t.task == task]
    peft_model, info = finetune(model, init, data, adapters, train, seed)
    begun = time.perf_counter()
    eval_seed = settings["eval_seed"] + seed  # other goals in every seed, the same for both inits
    evaluation = evaluate_success(
        peft_model,
        task,
        settings["eval_episodes"],
        eval_seed,
        target_return(data, task),
        settings["eval_max_steps"],
    )
    eval_seconds = time.perf_counter() - begun
    env_steps = sum(e["steps"] for e in evaluation["episodes"])
    timings.setdefault("finetune_step_seconds", info["train_seconds"] / train.steps)
    timings.setdefault(
        "eval_step_seconds", max(eval_seconds - timings.get("setup_seconds", 0.0), 0.0) / env_steps
    )
    result = {
        "init": init,
        "task": task,
        "seed": seed,
        "settings": settings,
        **info,
        "success_rate": evaluation["success_rate"],
        "eval_seed": eval_seed,
        "episodes": evaluation["episodes"],
        "eval_seconds": round(eval_seconds, 2),
        "git_commit": provenance_at_start()["git_commit"],
        "code_files": code_files(),
    }
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(file, json.dumps(result))
    return result, False


def zero_shot(
    settings: dict[str, Any], model: Any, demos: list[Any], work: Path
) -> dict[str, float]:
    """The pre-trained model on the held-out tasks, before any fine-tuning, on seed 0's goals
    (stored, reused; shown, not tested)."""
    from eva_lora.experiments.decision import evaluate_success, target_return

    file = work / "zero_shot.json"
    wanted = {
        **subset(settings, "pretrained"),
        **subset(settings, "finetune_demos"),
        "zero_shot_episodes": settings["zero_shot_episodes"],
    }
    if file.is_file():
        found = json.loads(file.read_text())
        if found.get("settings") == wanted:
            return found["success_rate"]
    rates = {
        task: evaluate_success(
            model,
            task,
            settings["zero_shot_episodes"],
            settings["eval_seed"],
            target_return(demos, task),
            settings["eval_max_steps"],
        )["success_rate"]
        for task in settings["finetune_tasks"]
    }
    atomic_write_text(file, json.dumps({"settings": wanted, "success_rate": rates}))
    return rates


def measure_setup(timings: dict[str, float]) -> None:
    """Seconds to set up one task's environment and goals (Meta-World builds 50 goals each time)."""
    from eva_lora.experiments.decision import task_env

    begun = time.perf_counter()
    task_env(PRETRAIN_TASKS[0], 0)[0].close()
    timings["setup_seconds"] = round(time.perf_counter() - begun, 3)


def estimate_full(timings: dict[str, float], quick: dict[str, Any]) -> float | None:
    """Seconds the full grid would take on this machine, from the --quick pieces' times (same model
    and batch size, so a training step costs the same; set-up time taken out of the per-step costs).

    Assumes expert episodes of ~85 steps (measured: 45-130 by task) and evaluation episodes of 150
    steps on average (a success ends an episode, a failure runs 200)."""
    keys = (
        "setup_seconds",
        "pretrain_demo_seconds",
        "pretrain_demo_steps",
        "pretrain_step_seconds",
        "finetune_step_seconds",
        "eval_step_seconds",
    )
    if not all(k in timings for k in keys):
        return None
    (full, seeds), setup = settings_for(False), timings["setup_seconds"]
    demo_step = max(
        timings["pretrain_demo_seconds"] - setup * len(quick["pretrain_tasks"]), 0.0
    ) / max(timings["pretrain_demo_steps"], 1)
    n_pre, n_ft = len(full["pretrain_tasks"]), len(full["finetune_tasks"])
    episodes = n_pre * full["pretrain_episodes"] + n_ft * full["finetune_episodes"]
    runs = 2 * len(seeds) * n_ft  # LoRA and EVA, each seed, each held-out task
    eval_episodes = (
        runs * full["eval_episodes"]
        + n_ft * full["zero_shot_episodes"]
        + n_pre * full["pretrain_eval_episodes"]
    )
    # demonstrations, evaluations (pre-trained, zero-shot, each run)
    setups = 2 * (n_pre + n_ft) + runs
    return (
        setup * setups
        + demo_step * 85 * episodes
        + timings["pretrain_step_seconds"] * full["pretrain_steps"]
        + timings["finetune_step_seconds"] * full["finetune_steps"] * runs
        + timings["eval_step_seconds"] * 150 * eval_episodes
    )


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """The grid (or this process's shard of it); the result once every run is there."""
    args = parse_args(argv)
    shard, shards = parse_shard(args.shard)
    torch.set_num_threads(args.threads)
    settings, seeds = settings_for(args.quick)
    work = args.work / ("quick" if args.quick else "full")
    started, timings, runs = time.perf_counter(), {}, {}
    pre_demos = demonstrations("pretrain", settings, work, timings)
    ft_demos = demonstrations("finetune", settings, work, timings)
    if args.quick:  # after the demonstrations: Meta-World's first environment also pays for imports
        measure_setup(timings)
    model, pre_info = pretrained_model(settings, pre_demos, work, timings)
    before = zero_shot(settings, model, ft_demos, work)
    log(f"pre-trained model on the held-out tasks (no fine-tuning): {before}")
    grid = [
        (init, task, seed)
        for init in ("lora", "eva")
        for task in settings["finetune_tasks"]
        for seed in seeds
    ]
    missing = 0
    for index, (init, task, seed) in enumerate(grid):
        if index % shards != shard:  # another shard's run: read back if it is there
            found = stored_run(init, task, seed, settings, work)
            if found is None:
                missing += 1
                continue
            result, reused = found, True
        else:
            result, reused = run_one(init, task, seed, settings, model, ft_demos, work, timings)
        runs.setdefault(init, {}).setdefault(task, []).append(result)
        log(
            f"[{index + 1}/{len(grid)}] {init} {task} seed {seed}: success "
            f"{result['success_rate']:.2f} "
            f"({'reused' if reused else f'{time.perf_counter() - started:.0f} s so far'})"
        )
    if missing:
        log(
            f"shard {shard}/{shards} done; {missing} run(s) of other shards not there yet: when "
            "they are, run this script without --shard to write the result"
        )
        return None
    record = {
        "quick": args.quick,
        "seeds": seeds,
        "settings": settings,
        "runs": runs,
        "demonstrations": {"pretrain": demo_summary(pre_demos), "finetune": demo_summary(ft_demos)},
        "pretrain": {
            "final_loss": pre_info["losses"][-1],
            "train_seconds": pre_info["train_seconds"],
            "success_on_pretrain_tasks": pre_info["success_on_pretrain_tasks"],
        },
        "zero_shot": before,
        "timings": timings,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not args.quick:
        record["plan"] = plans.stamp("decision")
    if args.quick:
        estimate = estimate_full(timings, settings)
        record["estimated_full_seconds"] = None if estimate is None else round(estimate)
        if estimate is not None:
            log(
                f"estimated full grid on this machine: {estimate / 60:.0f} min (from this run's "
                "per-step times)"
            )
        else:
            log(
                "no estimate of the full grid: its pieces were read back, not measured (delete "
                "--work/quick)"
            )
    write_results(
        args.out,
        "decision",
        record,
        markdown(record),
        made_at=oldest_commit(
            [r.get("git_commit") for by in runs.values() for t in by.values() for r in t]
        ),
        code_used=united_code_files(
            [r.get("code_files") for by in runs.values() for t in by.values() for r in t]
        ),
    )
    return record


def stored_run(
    init: str, task: str, seed: int, settings: dict[str, Any], work: Path
) -> dict[str, Any] | None:
    """A finished run with these settings (made by this or another shard), or None."""
    file = work / f"{init}_{task}_seed{seed}.json"
    if not file.is_file():
        return None
    found = json.loads(file.read_text())
    return found if found.get("settings") == settings else None


def per_seed_means(record: dict[str, Any], init: str, tasks: list[str]) -> list[float]:
    """Mean success rate over ``tasks`` for each seed, in seed order."""
    by_task = record["runs"][init]
    return [
        statistics.fmean(by_task[task][i]["success_rate"] for task in tasks)
        for i in range(len(record["seeds"]))
    ]


def signal_tasks(record: dict[str, Any]) -> list[str]:
    """Held-out tasks where runs differ at all (``no_signal``: all within 2 points, left out)."""
    tasks = record["settings"]["finetune_tasks"]
    return [
        t
        for t in tasks
        if not no_signal(
            [r["success_rate"] for init in record["runs"] for r in record["runs"][init][t]]
        )
    ]


def successes(record: dict[str, Any], init: str) -> list[list[list[bool]]]:
    """``[task][seed][episode]``: whether ``init``'s run succeeded in that episode."""
    return [
        [[e["success"] for e in run["episodes"]] for run in record["runs"][init][task]]
        for task in record["settings"]["finetune_tasks"]
    ]


def verdict(record: dict[str, Any]) -> tuple[str, str]:
    """(verdict, text) for "EVA beats LoRA in success rate".

    Runs evaluated on other goals in every seed (the plan's runs): the plan's nested bootstrap over
    tasks, seeds and episodes, every task counted; pooled McNemar and the leave-one-task-out range
    are printed beside it. The pilot's runs (the same goals in every seed): the paired rule over
    seeds on the tasks with signal, as it was judged then."""
    if "eval_seed" not in record["runs"]["eva"][record["settings"]["finetune_tasks"][0]][0]:
        return pilot_verdict(record)
    tasks = record["settings"]["finetune_tasks"]
    eva, lora = successes(record, "eva"), successes(record, "lora")
    effect, p = nested_bootstrap(eva, lora)
    adjusted = holm([p])[0]
    found = item_verdict(effect, adjusted)
    flat = lambda x: [[e for task in x for run in task for e in run]]  # noqa: E731
    only_eva, only_lora, p_pooled = mcnemar(flat(eva), flat(lora))
    left_out = (
        {
            task: nested_mean(eva[:i] + eva[i + 1 :]) - nested_mean(lora[:i] + lora[i + 1 :])
            for i, task in enumerate(tasks)
        }
        if len(tasks) > 1
        else {}
    )
    shape = f"{len(tasks)} task(s) x {len(eva[0])} seed(s) x {len(eva[0][0])} episodes"
    text = (
        f"EVA vs LoRA {100 * effect:+.2f} points of success ({shape}; the plan's test, nested "
        f"bootstrap over tasks, seeds and episodes: p {p:.3g}, Holm {adjusted:.3g}: {found}); "
        f"beside it, not deciding: episodes pooled, {only_eva} only EVA succeeded, {only_lora} "
        f"only LoRA (McNemar p {p_pooled:.3g})"
    )
    if left_out:
        low = min(left_out, key=left_out.get)
        high = max(left_out, key=left_out.get)
        text += (
            f"; with one task left out {100 * left_out[low]:+.2f} (without "
            f"{low.removesuffix('-v3')}) to {100 * left_out[high]:+.2f} (without "
            f"{high.removesuffix('-v3')})"
        )
    return found, text


def nested_mean(values: list[list[list[bool]]]) -> float:
    return statistics.fmean(e for task in values for run in task for e in run)


def pilot_verdict(record: dict[str, Any]) -> tuple[str, str]:
    """The pilot's rule: paired over seeds, mean over the tasks with signal."""
    tasks = signal_tasks(record)
    if not tasks:
        return "not shown", "no held-out task carries signal (every run scored the same)"
    found, mean, threshold = paired(
        per_seed_means(record, "eva", tasks),
        per_seed_means(record, "lora", tasks),
        items=len(tasks) * record["settings"]["eval_episodes"],
    )
    return found, describe(
        f"EVA vs LoRA (success rate, mean of {len(tasks)} task(s))", found, mean, threshold
    )


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def markdown(record: dict[str, Any]) -> str:
    s, tasks = record["settings"], record["settings"]["finetune_tasks"]
    quick = " (--quick: proves nothing)" if record["quick"] else ""
    pilot = "eval_seed" not in record["runs"]["eva"][tasks[0]][0]
    goals = "the same goals in every seed" if pilot else "other goals in every seed"
    planned = (
        f" Grid and test from `{record['plan']['file']}` (sha256 {record['plan']['sha256'][:12]})."
        if record.get("plan")
        else ""
    )
    zero_shot_episodes = s.get("zero_shot_episodes", s["eval_episodes"])
    lines = [
        "# Decision making: EVA vs LoRA on a Decision Transformer, Meta-World "
        f"({len(record['seeds'])} seed(s))"
        f"{quick}",
        "",
        f"Pre-trained on {len(s['pretrain_tasks'])} tasks x {s['pretrain_episodes']} expert "
        f"episodes ({s['pretrain_steps']} steps; final loss "
        f"{record['pretrain']['final_loss']:.4f}), fine-tuned on each held-out task "
        f"({s['finetune_episodes']} episodes, {s['finetune_steps']} steps, rank {s['rank']}, "
        f"EVA rho {s['rho']}). DT: {s['layers']} layers, {s['heads']} heads, hidden {s['hidden']}, "
        f"context {s['context']}. "
        f"Success rate (%) over {s['eval_episodes']} evaluation episodes per task and seed "
        f"({goals}), mean ± std over seeds.{planned}",
        "",
        "| init | mean | "
        + " | ".join(t.removesuffix("-v3") for t in tasks)
        + " | final loss | init s |",
        "|---|---|" + "---|" * len(tasks) + "---|---|",
        f"| pre-trained, no fine-tuning ({zero_shot_episodes} episodes, seed 0's goals) | "
        f"{100 * statistics.fmean(record['zero_shot'].values()):.1f} | "
        + " | ".join(f"{100 * record['zero_shot'][t]:.1f}" for t in tasks)
        + " | - | - |",
    ]
    for init, by_task in record["runs"].items():
        every = [r for t in tasks for r in by_task[t]]
        final = statistics.fmean(r["losses"][-1] for r in every)
        init_s = statistics.fmean(r.get("init_seconds", 0.0) for r in every)
        lines.append(
            f"| {init} | {_mean_std(per_seed_means(record, init, tasks))} | "
            + " | ".join(_mean_std([r["success_rate"] for r in by_task[t]]) for t in tasks)
            + f" | {final:.4f} | {init_s:.1f} |"
        )
    own = record["pretrain"]["success_on_pretrain_tasks"]
    lines += [
        "",
        "Pre-trained model on its own tasks (%): "
        + ", ".join(f"{t.removesuffix('-v3')} {100 * v:.0f}" for t, v in own.items())
        + ".",
        "",
        f"Verdict: {verdict(record)[1]}.",
        "",
        (
            "Caveats: a pilot: a DT far smaller than the paper's, 10 evaluation episodes per task "
            "on the same goals in every seed, and held-out tasks chosen after a seed-0 run of both "
            "inits (so the choice of tasks is not independent of the outcome)."
            if pilot
            else "Caveats: a DT far smaller than the paper's (see the script's docstring for every "
            "change from the paper), 300 fine-tuning steps, and one learning rate for both methods "
            "(the pilot's, fixed in the plan, not tuned per method)."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
