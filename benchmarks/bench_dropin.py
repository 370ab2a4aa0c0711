"""A PEFT user's EVA script run twice on the same data: PEFT's functions, then eva-lora's drop-in.

    # SmolLM2-135M on GSM8K questions (bundled slice)
    python benchmarks/bench_dropin.py
    # a Qwen2 built from its config (random weights)
    python benchmarks/bench_dropin.py --model qwen2
    python benchmarks/bench_dropin.py --model minilm    # all-MiniLM-L6-v2 on SST-2 sentences
    # GPU, random weights
    python benchmarks/bench_dropin.py --model smollm2-config --device cuda --dtype bfloat16
    # eva-lora at several convergence scales
    python benchmarks/bench_dropin.py --scales 0.05,0.1,0.25

The script below is the same for both; only the import of ``initialize_lora_eva_weights`` changes.
Prints one JSON line per implementation: seconds, forward passes, peak RSS above the start, the rank
budget used, how far the two sets of A rows agree (mean |cos| of the top components per layer), and
the variance each layer's A rows capture of the *whole data set* (every batch of the loader, the
float64 exact PCA: trace(Q^T C Q) / the top-r eigenvalues, r the layer's rank), min and mean over
layers. ``--scales`` reruns eva-lora with ``convergence.EPSILON_SCALE`` set to each value (how the
default was chosen).
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
from bench_init import PeakRSS, minilm_path  # noqa: E402


def data(model_name: str, batch_size: int, max_length: int, dtype: str = "float32"):
    """(model, dataloader) as a PEFT user would build them."""
    from torch.utils.data import DataLoader

    from eva_lora.app.models import load_model
    from eva_lora.app.preprocess import Collator, tokenize
    from eva_lora.app.tasks import get_task

    task = get_task("sst2" if model_name == "minilm" else "gsm8k")
    # SmolLM2-135M's shapes, random weights (where its weights cannot travel)
    if model_name == "smollm2-config":
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=tokenizer.vocab_size,
                    hidden_size=576,
                    intermediate_size=1536,
                    num_hidden_layers=30,
                    num_attention_heads=9,
                    num_key_value_heads=3,
                    max_position_embeddings=2048,
                    tie_word_embeddings=True,
                )
            ).eval()
    else:
        model, tokenizer = load_model(
            "smollm2" if model_name == "qwen2" else model_name, task.kind, task.num_labels
        )
    # a second architecture: Qwen2 at SmolLM2's size, random weights, same data
    if model_name == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = model.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(
                Qwen2Config(
                    vocab_size=cfg.vocab_size,
                    hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_hidden_layers,
                    num_attention_heads=cfg.num_attention_heads,
                    num_key_value_heads=cfg.num_key_value_heads,
                    max_position_embeddings=cfg.max_position_embeddings,
                    tie_word_embeddings=True,
                )
            ).eval()
    model = model.to(getattr(torch, dtype))
    prepared = tokenize(
        task.load("train", limit=400), tokenizer, task.kind, max_length, drop_long=True
    )
    loader = DataLoader(
        prepared.dataset.with_format(None),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collator(tokenizer.pad_token_id),
    )
    return model, loader


def users_script(initialize_lora_eva_weights, model, loader):
    """What a PEFT user writes (PEFT's documented EVA usage)."""
    from peft import EvaConfig, LoraConfig, get_peft_model

    config = LoraConfig(
        r=16,
        lora_alpha=1,
        target_modules="all-linear",
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.99),
    )
    peft_model = get_peft_model(model, config)
    initialize_lora_eva_weights(peft_model, loader, show_progress_bar=False)
    return peft_model


def whole_data_covariances(model, loader) -> dict[str, torch.Tensor]:
    """float64 covariance of each adapted layer's input over the loader (label mask as EVA)."""
    from eva_lora import EvaConfig
    from eva_lora.capture import collect_statistics

    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
    groups = collect_statistics(
        model, batches, EvaConfig(target_modules="all-linear", stats_dtype="float64")
    )
    return {name: g.stats.covariance() for g in groups for name in g.names}


def captured(
    covariances: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Whole-data captured variance of each layer's A rows (min, mean over layers with rank > 0;
    the layer of the min and its rank, to see where a method falls short)."""
    from eva_lora.pca import captured_variance

    scores = {}
    for name, a in rows.items():
        base = name.removeprefix("base_model.model.")
        if a.shape[0] and base in covariances:
            scores[base] = captured_variance(covariances[base], a.double().cpu())
    worst = min(scores, key=scores.get)
    return {
        "min": round(scores[worst], 5),
        "mean": round(sum(scores.values()) / len(scores), 5),
        "layers": len(scores),
        "worst_layer": worst,
        "worst_layer_rank": int(rows.get(f"base_model.model.{worst}", rows.get(worst)).shape[0]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=["smollm2", "qwen2", "minilm", "smollm2-config"], default="smollm2"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--scales", default="", help="comma-separated EPSILON_SCALE values for extra eva-lora runs"
    )
    parser.add_argument("--skip-quality", action="store_true", help="no whole-data reference")
    parser.add_argument(
        "--skip-peft", action="store_true", help="eva-lora runs only (no agreement figure)"
    )
    args = parser.parse_args(argv)
    import peft

    import eva_lora
    from eva_lora import convergence

    model, loader = data(args.model, args.batch_size, args.max_length, args.dtype)
    model = model.to(args.device)
    runs = [] if args.skip_peft else [("peft", peft.initialize_lora_eva_weights, None)]
    runs.append(("eva-lora", eva_lora.initialize_lora_eva_weights, convergence.EPSILON_SCALE))
    runs += [
        (f"eva-lora scale {v}", eva_lora.initialize_lora_eva_weights, float(v))
        for v in args.scales.split(",")
        if v and float(v) != convergence.EPSILON_SCALE
    ]
    found, default_scale = {}, convergence.EPSILON_SCALE
    for name, implementation, scale in runs:
        convergence.EPSILON_SCALE = default_scale if scale is None else scale
        calls = [0]
        copy = deepcopy(model)
        copy.register_forward_pre_hook(lambda *a, calls=calls: calls.__setitem__(0, calls[0] + 1))
        torch.manual_seed(0)
        with PeakRSS() as mem:
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                peft_model = users_script(implementation, copy, loader)
            except Exception as err:  # e.g. PEFT's EVA on a dtype it does not take: report, go on
                failure = f"{type(err).__name__}: {err}"[:300]
                print(json.dumps({"implementation": name, "error": failure}), flush=True)
                continue
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        rows = {
            n: m.lora_A["default"].weight.detach().cpu().clone()
            for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A
        }
        found[name] = rows
        extra = (
            {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
            if args.device == "cuda"
            else {}
        )
        print(
            json.dumps(
                {
                    "implementation": name,
                    "model": args.model,
                    "dtype": args.dtype,
                    "device": args.device,
                    "seconds": round(seconds, 2),
                    "forward_passes": calls[0],
                    "peak_rss_mb": round(mem.mb, 1),
                    **extra,
                    "adapted_layers": len(rows),
                    "rank_budget": sum(r.shape[0] for r in rows.values()),
                    "batches_available": len(loader),
                }
            ),
            flush=True,
        )
        del peft_model, copy
    convergence.EPSILON_SCALE = default_scale
    cosines = []
    found.setdefault("peft", {})
    for name, ours in found["eva-lora"].items():
        theirs = found["peft"].get(name)
        if theirs is not None:
            k = min(ours.shape[0], theirs.shape[0], 4)
            if k:
                cosines.append(
                    torch.cosine_similarity(ours[:k].float(), theirs[:k].float(), dim=1)
                    .abs()
                    .mean()
                )
    if cosines:
        stacked = torch.stack(cosines)
        print(
            json.dumps(
                {
                    "agreement": "mean |cos| of the top-4 A rows, per layer, then averaged",
                    "mean": round(float(stacked.mean()), 4),
                    "min_layer": round(float(stacked.min()), 4),
                    "layers": len(cosines),
                }
            ),
            flush=True,
        )
    if args.skip_quality:
        return
    covariances = whole_data_covariances(model, loader)
    for name, rows in found.items():
        if not rows:
            continue
        print(
            json.dumps(
                {
                    "implementation": name,
                    "quality": "captured variance of the whole data set",
                    **captured(covariances, rows),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
