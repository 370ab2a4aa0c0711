"""Markdown tables of a device_check.sh run: python benchmarks/device_summary.py OUT_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def records(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def table(rows: list[dict], keys: list[str]) -> str:
    if not rows:
        return "(no records)\n"
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(out: str) -> None:
    root = Path(out)
    print("# device_check\n")
    print("```\n" + (root / "machine.txt").read_text() + "```\n") if (
        root / "machine.txt"
    ).is_file() else None
    print("## Steps\n")
    print(table(records(root / "steps.jsonl"), ["step", "exit", "seconds"]))
    tests = (
        (root / "cuda_tests.jsonl").read_text(errors="replace").strip().splitlines()[-3:]
        if (root / "cuda_tests.jsonl").is_file()
        else []
    )
    print("## CUDA tests\n\n```\n" + "\n".join(tests) + "\n```\n")
    print("## Small solves (ms per check)\n")
    print(
        table(
            records(root / "small_solves.jsonl"),
            ["m", "groups", "dtype", "batched_ms", "looped_ms", "host_ms"],
        )
    )
    print("## bench_init, random Llama (512 x 8), bf16\n")
    print(
        table(
            records(root / "init_llama.jsonl"),
            [
                "method",
                "quality",
                "seconds",
                "forward_passes",
                "plain_forward_seconds",
                "overhead_ratio",
                "speedup_of_eva_lora",
                "captured_variance",
            ],
        )
    )
    print("## Where the overhead goes: profile_init, random Llama (512 x 8), bf16\n")
    print(
        table(
            records(root / "profile_llama.jsonl"),
            [
                "part",
                "overhead_ratio",
                "host_seconds",
                "device_seconds",
                "device_of_plain",
                "plain_seconds",
            ],
        )
    )
    print("## bench_scale, 8B widths, 2 blocks, 6 x 16k tokens, bf16\n")
    print(
        table(
            records(root / "scale_8b.jsonl"),
            [
                "method",
                "seconds",
                "plain_forward_seconds",
                "overhead",
                "extra_peak_mb",
                "statistic_mb",
                "min",
                "stopped_early",
            ],
        )
    )
    print("## Drop-in: PEFT user's script, SmolLM2-135M shapes, bf16\n")
    print(
        table(
            records(root / "dropin_bf16.jsonl"),
            [
                "implementation",
                "seconds",
                "forward_passes",
                "cuda_peak_mb",
                "rank_budget",
                "mean",
                "min_layer",
            ],
        )
    )
    print("## Peak memory vs vocabulary\n")
    print(
        table(
            records(root / "vocab.jsonl"),
            [
                "vocab",
                "hidden",
                "tokens_per_batch",
                "eva_seconds",
                "eva_peak_above_model_mb",
                "one_forward_with_labels_peak_above_model_mb",
            ],
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
