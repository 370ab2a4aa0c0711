"""Both evaluators on one trained adapter, side by side: eva-lora's own and lm-evaluation-harness.

    python benchmarks/paper_check/evaluators.py \
        --adapter out/paper_check/lm_generation/math/EVA_rho=2/seed0/adapter \
        --task commonsense --eval-limit 20

The paper's authors scored common sense with lm-evaluation-harness. Ours is faster and has no
dependencies, so it must give the same numbers: both see the same prompts (``Task`` rows), decode
greedily and score with our answer extraction; what differs is the machinery (batching, padding,
stop sequences, how ``generate`` is called). This script reports both accuracies per test set, the
number of identical generations, and every generation that differs, so a difference is explained
by the text that caused it rather than guessed at.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import RESULTS, write_results

from eva_lora.app.recipes.evaluate import evaluate_task, load_with_adapter
from eva_lora.app.recipes.harness import run_harness
from eva_lora.app.run_config import build_run_config
from eva_lora.app.tasks import eval_tasks

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder trained on --model")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--task", default="commonsense", help="a generation task (commonsense: its 7 test sets)"
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--eval-limit", type=int, default=20, help="test questions per test set (the first N)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="prompt tokens kept (at most the model's positions)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def ours(cfg: Any, adapter: str) -> tuple[dict[str, float], dict[str, list[str]], float]:
    """(accuracy per test set, generations per test set, seconds) from eva-lora's evaluator."""
    start = time.perf_counter()
    model, tokenizer = load_with_adapter(cfg, adapter)
    accuracy, generations = {}, {}
    for task in eval_tasks(cfg.task):
        data = task.load("eval", cfg.data_dir, None, cfg.eval_limit)
        metrics, records = evaluate_task(
            model, tokenizer, task, data, cfg.eval_batch_size, cfg.max_new_tokens
        )
        accuracy[task.name] = metrics[task.main_metric]
        generations[task.name] = [r["generation"] for r in records]
    return accuracy, generations, time.perf_counter() - start


def _shown(path: str) -> str:
    """The adapter's path relative to the repository when inside it (the report is read there)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = build_run_config(
        overrides={
            "model": args.model,
            "task": args.task,
            "data_dir": str(args.data_dir),
            "eval_limit": args.eval_limit,
            "max_new_tokens": args.max_new_tokens,
            "eval_batch_size": args.batch_size,
            "max_length": args.max_length,
        }
    )
    mine, mine_text, mine_seconds = ours(cfg, args.adapter)
    start = time.perf_counter()
    harness = run_harness(cfg, args.adapter, samples=True)
    harness_seconds = time.perf_counter() - start
    rows, differences = [], []
    for name, accuracy in mine.items():
        theirs = harness["generations"][name]
        same = sum(a == b for a, b in zip(mine_text[name], theirs))
        rows.append(
            {
                "test set": name,
                "n": len(theirs),
                "ours": accuracy,
                "lm-eval": harness["metrics"][name],
                "identical generations": same,
            }
        )
        differences += [
            {"test set": name, "index": i, "ours": a, "lm-eval": b}
            for i, (a, b) in enumerate(zip(mine_text[name], theirs))
            if a != b
        ]
    record = {
        "adapter": _shown(args.adapter),
        "model": args.model,
        "task": args.task,
        "eval_limit": args.eval_limit,
        "max_new_tokens": args.max_new_tokens,
        "harness": harness["harness"],
        "rows": rows,
        "differences": differences,
        "seconds": {"ours": round(mine_seconds, 1), "lm-eval": round(harness_seconds, 1)},
    }
    write_results(args.out, "evaluators", record, markdown(record))
    return record


def markdown(record: dict[str, Any]) -> str:
    total = sum(r["n"] for r in record["rows"])
    same = sum(r["identical generations"] for r in record["rows"])
    lines = [
        "## Our evaluator and lm-evaluation-harness on one adapter",
        "",
        f"`python benchmarks/paper_check/evaluators.py --adapter {record['adapter']} --task "
        f"{record['task']} "
        f"--eval-limit {record['eval_limit']}` ({record['harness']}; greedy, up to "
        f"{record['max_new_tokens']} "
        f"new tokens; ours {record['seconds']['ours']} s, lm-eval {record['seconds']['lm-eval']} s "
        "including model loading).",
        "",
        "| test set | n | ours | lm-eval | identical generations |",
        "|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['test set']} | {r['n']} | {100 * r['ours']:.2f} | {100 * r['lm-eval']:.2f} | "
            f"{r['identical generations']} of {r['n']} |"
        )
    lines += ["", f"{same} of {total} generations are identical."]
    for d in record["differences"][:5]:
        ours_text, theirs_text = json.dumps(d["ours"]), json.dumps(d["lm-eval"])
        lines.append(f"- {d['test set']} #{d['index']}: ours {ours_text} / lm-eval {theirs_text}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
