"""A PEFT user's EVA script, run twice on the same data: with PEFT's functions and with eva-lora's drop-in.

    python benchmarks/bench_dropin.py                   # SmolLM2-135M on GSM8K questions (bundled slice)
    python benchmarks/bench_dropin.py --model minilm    # all-MiniLM-L6-v2 on SST-2 sentences

The script below is the same for both; only the import of ``initialize_lora_eva_weights`` changes.
Prints one JSON line per implementation: seconds, forward passes, peak RSS above the start, the rank
budget used, and how far the two sets of A rows agree (mean |cos| of the top components per layer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from copy import deepcopy
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import PeakRSS  # noqa: E402


def data(model_name: str, batch_size: int, max_length: int):
    """(model, dataloader) as a PEFT user would build them."""
    from torch.utils.data import DataLoader

    from eva_lora.app.models import load_model
    from eva_lora.app.preprocess import Collator, tokenize
    from eva_lora.app.tasks import get_task

    task = get_task("gsm8k" if model_name == "smollm2" else "sst2")
    model, tokenizer = load_model(model_name, task.kind, task.num_labels)
    prepared = tokenize(task.load("train", limit=400), tokenizer, task.kind, max_length, drop_long=True)
    loader = DataLoader(prepared.dataset.with_format(None), batch_size=batch_size, shuffle=False,
                        collate_fn=Collator(tokenizer.pad_token_id))
    return model, loader


def users_script(initialize_lora_eva_weights, model, loader):
    """What a PEFT user writes (PEFT's documented EVA usage)."""
    from peft import EvaConfig, LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=1, target_modules="all-linear", init_lora_weights="eva",
                        eva_config=EvaConfig(rho=2.0, tau=0.99))
    peft_model = get_peft_model(model, config)
    initialize_lora_eva_weights(peft_model, loader, show_progress_bar=False)
    return peft_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args(argv)
    import peft

    import eva_lora

    model, loader = data(args.model, args.batch_size, args.max_length)
    found = {}
    for name, implementation in (("peft", peft.initialize_lora_eva_weights),
                                 ("eva-lora", eva_lora.initialize_lora_eva_weights)):
        calls = [0]
        copy = deepcopy(model)
        copy.register_forward_pre_hook(lambda *a, calls=calls: calls.__setitem__(0, calls[0] + 1))
        torch.manual_seed(0)
        with PeakRSS() as mem:
            start = time.perf_counter()
            peft_model = users_script(implementation, copy, loader)
            seconds = time.perf_counter() - start
        rows = {n: m.lora_A["default"].weight.detach().clone() for n, m in peft_model.named_modules()
                if hasattr(m, "lora_A") and "default" in m.lora_A}
        found[name] = rows
        print(json.dumps({"implementation": name, "model": args.model, "seconds": round(seconds, 2),
                          "forward_passes": calls[0], "peak_rss_mb": round(mem.mb, 1),
                          "adapted_layers": len(rows), "rank_budget": sum(r.shape[0] for r in rows.values()),
                          "batches_available": len(loader)}), flush=True)
    cosines = []
    for name, ours in found["eva-lora"].items():
        theirs = found["peft"].get(name)
        if theirs is not None:
            k = min(ours.shape[0], theirs.shape[0], 4)
            if k:
                cosines.append(torch.cosine_similarity(ours[:k], theirs[:k], dim=1).abs().mean())
    print(json.dumps({"agreement": "mean |cos| of the top-4 A rows, per layer, then averaged",
                      "mean": round(float(torch.stack(cosines).mean()), 4),
                      "min_layer": round(float(torch.stack(cosines).min()), 4), "layers": len(cosines)}))


if __name__ == "__main__":
    main()
