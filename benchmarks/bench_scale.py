"""EVA at 8B-70B scale: planned memory and flops per method, and measured cost at 8B widths.

    python benchmarks/bench_scale.py plan                         # (a) Llama-3-8B / 70B, meta device, 1 and 8 ranks
    python benchmarks/bench_scale.py measure                      # (b) 8B widths, 2 blocks, 12 batches of 2 x 128
    python benchmarks/bench_scale.py measure --batch 4 --seq 512  # (b) the same at 4 x 512
    python benchmarks/bench_scale.py measure --device cuda --layers 8 --batch 4 --seq 512  # (c) on a GPU
    python benchmarks/bench_scale.py vocab                        # (d) EVA's peak memory vs the vocabulary size

``plan`` builds the model on the meta device (no weights), runs one probe pass to find the input groups
(q/k/v and gate/up share one), and prints for each method the statistic memory per rank (the largest
rank) and the multiply-adds per token, next to the forward pass's. ``measure`` runs, in one process
and on the same batches: plain forward passes, eva-lora (statistics="auto", which is a sketch at
these widths; and statistics="exact", the previous design), and PEFT's ``get_eva_state_dict``; every
group is kept active for every batch (tau close to 1). Quality is the captured variance of each
group's components against the float64 PCA of exactly the tokens that group absorbed.
Each line of output is one JSON record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import PeakRSS, minilm_path, sentences  # noqa: E402
from eva_lora import EvaConfig, compute_eva_state  # noqa: E402
from eva_lora.capture import ActivationCapture, collect_statistics  # noqa: E402
from eva_lora.pca import block_bounds  # noqa: E402
from eva_lora.planning import plan_statistics, rank_loads  # noqa: E402
from eva_lora.statistics import default_explore  # noqa: E402
from eva_lora.targets import find_target_layers, layer_shapes  # noqa: E402

CONFIGS = {  # hidden, intermediate, blocks, heads, kv heads, vocab
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256),
}
MB = 2**20


def llama_config(name: str, layers: int | None = None, vocab: int | None = None):
    from transformers import LlamaConfig

    hidden, inter, blocks, heads, kv, vocab_size = CONFIGS[name]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or blocks,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab or vocab_size,
                       max_position_embeddings=4096)


# ---- (a) plan ------------------------------------------------------------------------------------
def meta_groups(name: str, settings: EvaConfig) -> tuple[list[list[str]], list[int], dict[str, list[int]]]:
    """Input groups of the full-size model, from one probe pass on the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(name))
    layers = find_target_layers(model, settings)
    capture = ActivationCapture(layers)
    with torch.no_grad(), capture:
        ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
        capture.set_batch({"input_ids": ids})
        model(input_ids=ids)
        capture.finish_probe()
    return [g.names for g in capture.groups], [g.dim for g in capture.groups], layer_shapes(layers)


def exact_macs(dim: int) -> float:
    """Multiply-adds per row of the exact update: the upper block triangle of x^T x."""
    bounds = block_bounds(dim)
    return sum((b - a) * (e - c) for i, (a, b) in enumerate(bounds) for c, e in bounds[i:])


def sketch_macs(dim: int, size: int) -> int:
    """Multiply-adds per row of a sketch when every batch is its own window (check_every=1): the
    window's new directions (``G = X^T Phi``, ``A [G, basis]``) and ``W = X K``, ``W^T W``."""
    explore = default_explore(min(size, dim))
    span = 2 * size + 2 * explore + 1
    return dim * (4 * size + 5 * explore + 1) + span * span


def plan(args: argparse.Namespace, emit) -> None:
    settings = EvaConfig(rank=args.rank, rho=args.rho)
    k, size = settings.max_components, settings.resolved_sketch_size
    for name in CONFIGS:
        groups, dims, shapes = meta_groups(name, settings)
        forward = sum(i * o for i, o in shapes.values())
        tokens = args.batch * args.seq
        for world in (1, 8):
            for method in ("exact", "sketch", "auto"):
                plans = plan_statistics(dims, EvaConfig(rank=args.rank, rho=args.rho, statistics=method), world)
                per_rank = rank_loads(plans, dims, size, world)  # held + the largest single update
                macs = sum(exact_macs(d) if p.kind == "exact" else sketch_macs(d, size) for p, d in zip(plans, dims))
                emit(model=name, method=f"eva-lora {method}", ranks=world, groups=len(groups),
                     stat_mb_per_rank=round(max(per_rank) / MB, 1), stat_macs_per_token=macs,
                     over_forward=round(macs / forward, 4),
                     batched_eigh_per_check=2 * any(p.kind == "sketch" for p in plans),
                     sketch_size=size if method != "exact" else None)
            # PEFT: an IncrementalPCA of k components per distinct input on every rank; each step stacks
            # (rows + k + 1) x d and runs svd_lowrank(q=2k, niter=4); under torch.distributed every
            # layer's rows are all-gathered to every rank first.
            persistent = sum(k * d * 4 + 8 * d for d in dims)
            widest = max(dims)
            transient = (world * tokens + k + 1) * widest * 4 * 3
            macs = sum(10 * 2 * k * d for d in dims)
            emit(model=name, method="peft ipca", ranks=world, groups=len(groups),
                 stat_mb_per_rank=round(persistent / MB, 1), transient_mb=round(transient / MB, 1),
                 stat_macs_per_token=macs, over_forward=round(macs / forward, 4),
                 gathered_rows_mb_per_layer=round(world * tokens * widest * 4 / MB, 1) if world > 1 else 0)
        emit(model=name, method="forward", macs_per_token=forward, target_layers=len(shapes))


# ---- (b) measure --------------------------------------------------------------------------------
def build(args: argparse.Namespace):
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config("llama-3-8b", args.layers, tok.vocab_size)).eval()
    if args.device == "cuda":
        model = model.to(torch.bfloat16)
    model = model.to(args.device)
    ids = torch.tensor(tok(" ".join(sentences()), add_special_tokens=False)["input_ids"])
    need = args.batches * args.batch * args.seq
    ids = ids.repeat(need // ids.numel() + 1)[:need].view(args.batches, args.batch, args.seq)
    batches = [{"input_ids": c.to(args.device), "attention_mask": torch.ones_like(c).to(args.device)} for c in ids]
    return model, batches


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Memory:
    """Peak memory of a block of code: process RSS on CPU, the allocator's peak on CUDA.

    Freed heap is handed back to the OS first (``malloc_trim``), so every block starts from the same
    footing; ``peak_mb`` is absolute, so a method's extra memory is its peak minus the peak of plain
    forward passes over the same batches (the activations both need)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Memory:
        import ctypes
        import gc

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated() / MB
        else:
            self.rss.__exit__(*exc)
            self.peak_mb = self.rss.peak / MB


def plain_forwards(model, batches, device: str) -> tuple[float, float]:
    """(seconds, peak MB) of plain forward passes over ``batches``."""
    with Memory(device) as mem:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, mem.peak_mb


def run_ours(model, batches, settings: dict, device: str):
    cfg = EvaConfig(**settings, tau=0.99999999, max_batches=len(batches))
    with Memory(device) as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync(device)
        start = time.perf_counter()
        state = compute_eva_state(model, batches, cfg, progress=False)
        sync(device)
        seconds = time.perf_counter() - start
    comps = {names[0]: c for names, c in zip(state.groups, state.group_components)}
    tokens = {names[0]: t for names, t in zip(state.groups, state.group_tokens)}
    return seconds, mem.peak_mb, comps, tokens, state


class _Enough(Exception):
    """Ends PEFT's loop (it cycles its dataloader until every layer converges) after N passes."""


def run_peft(model, batches, settings: dict, device: str):
    """PEFT's get_eva_state_dict over exactly ``len(batches)`` passes; its per-layer IPCA read from its hooks."""
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_eva_state_dict
    from peft.tuners.lora import eva as peft_eva

    calls, hooks = [0], []
    original_init = peft_eva.SVDHook.__init__

    def recording_init(self, *args, **kwargs):  # keep every hook, also those PEFT removes once converged
        original_init(self, *args, **kwargs)
        hooks.append(self)

    def forward(m, batch):
        calls[0] += 1
        if calls[0] > len(batches) + 1:  # PEFT's first pass only hashes inputs, as our probe
            raise _Enough
        return m(**batch)

    targets = sorted(find_target_layers(model, EvaConfig(**settings)))
    cfg = LoraConfig(r=settings["rank"], target_modules=targets,
                     eva_config=PeftEvaConfig(rho=settings["rho"], tau=0.99999999))
    peft_eva.SVDHook.__init__ = recording_init
    try:
        with Memory(device) as mem:
            sync(device)
            start = time.perf_counter()
            try:
                get_eva_state_dict(model, batches, cfg, forward_fn=forward, show_progress_bar=False)
            except _Enough:
                pass
            sync(device)
            seconds = time.perf_counter() - start
    finally:
        peft_eva.SVDHook.__init__ = original_init
    for module in model.modules():  # the loop was cut short: remove what PEFT would have removed
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, peft_eva._Hook):
                del module._forward_hooks[key]
    comps = {h.name: h.svd.components_.detach().float().cpu() for h in hooks if hasattr(h.svd, "components_")}
    tokens = {h.name: int(h.svd.n_samples_seen_) for h in hooks if hasattr(h.svd, "n_samples_seen_")}
    return seconds, mem.peak_mb, comps, tokens


def exact_reference(model, batches, settings: dict, k: int) -> list[tuple[list[str], torch.Tensor, float]]:
    """Per group: (names, float64 covariance of every token of ``batches``, sum of its top-k eigenvalues).

    Every method keeps every group active for every batch here, so one reference serves them all.
    """
    out = []
    for group in collect_statistics(model, batches, EvaConfig(**settings, stats_dtype="float64")):
        cov = group.stats.covariance()  # stays where the model is: a 14336-wide eigvalsh is slow on a CPU
        values = torch.linalg.eigvalsh(cov if cov.device.type == "cpu" else cov.float())
        out.append((group.names, cov, float(values[-k:].double().sum())))
    return out


def quality(reference, comps: dict[str, torch.Tensor], tokens: dict[str, int], total: int,
            k: int) -> tuple[dict[str, float], list[str]]:
    """Captured variance of each group's top-k rows against the float64 PCA of every token, for the
    groups that absorbed every token; and the groups that stopped early (their rank fell to 0, so the
    method stopped feeding them, as the paper's algorithm does), which the reference does not describe."""
    out, stopped = {}, []
    for names, cov, best in reference:
        name = next((n for n in names if n in comps), None)
        if name is None or tokens.get(name, 0) < total:
            stopped.append(names[0])
            continue
        basis, _ = torch.linalg.qr(comps[name][:k].to(cov).T)  # on the covariance's device
        out[name] = round(float(torch.trace(basis.T @ cov @ basis) / best), 5)
    return out, stopped


def measure(args: argparse.Namespace, emit) -> None:
    model, batches = build(args)
    settings = dict(rank=args.rank, rho=args.rho)
    k = EvaConfig(**settings).max_components
    emit(event="setup", device=args.device, layers=args.layers, batches=len(batches), batch=args.batch,
         seq=args.seq, threads=torch.get_num_threads(), **settings)
    plain_forwards(model, batches[:2], args.device)  # warm-up
    results = {}
    runs = [("eva-lora auto", {}), ("eva-lora auto, no early exit", {"early_exit": False})]
    if args.device == "cuda":  # TF32 for the statistics' products (off by default), and fewer checks
        runs += [("eva-lora auto, statistics_tf32", {"statistics_tf32": True}),
                 ("eva-lora auto, check_every=3", {"check_every": 3})]
    else:
        runs.append(("eva-lora sketch_size=128", {"sketch_size": 128}))
    if args.with_exact:
        runs.append(("eva-lora exact", {"statistics": "exact"}))
    def around(run):  # plain passes before and after each run: the machine drifts
        (before, plain_peak), out, (after, _) = plain_forwards(model, batches, args.device), run(), \
            plain_forwards(model, batches, args.device)
        seconds, peak = out[0], out[1]
        return out, {"seconds": round(seconds, 2), "plain_forward_seconds": [round(before, 2), round(after, 2)],
                     "overhead": round(2 * seconds / (before + after), 3), "peak_mb": round(peak, 1),
                     "plain_peak_mb": round(plain_peak, 1), "extra_peak_mb": round(peak - plain_peak, 1)}

    for label, extra in runs:
        (seconds, peak, comps, tokens, state), row = around(
            lambda extra=extra: run_ours(model, batches, {**settings, **extra}, args.device))
        emit(method=label, **row, statistics=sorted(set(state.group_statistics)),
             statistic_mb=round(state.history[-1]["statistic_bytes"] / MB, 1), forward_passes=len(batches))
        results[label] = (comps, tokens)
    if not args.skip_peft:
        try:
            (seconds, peak, comps, tokens), row = around(lambda: run_peft(model, batches, settings, args.device))
        except Exception as err:  # PEFT's EVA on this dtype / device: report and go on to the quality
            emit(method="peft", error=f"{type(err).__name__}: {err}"[:300])
        else:
            emit(method="peft", **row, forward_passes=len(batches) + 1)
            results["peft"] = (comps, tokens)
    if args.skip_quality:
        return
    reference = exact_reference(model, batches, settings, k)
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    for label, (comps, tokens) in results.items():
        scores, stopped = quality(reference, comps, tokens, total, k)
        emit(method=label, quality="captured variance vs exact PCA of the same tokens (groups fed every batch)",
             min=min(scores.values()), per_group=scores, stopped_early=stopped)


# ---- (d) vocabulary ---------------------------------------------------------------------------
def vocab(args: argparse.Namespace, emit) -> None:
    """Two Llamas that differ only in vocabulary size (32k, 262k), the same token batches (with labels,
    as a fine-tuning batch has): peak memory above the loaded model of EVA, and of one plain forward
    pass with those labels (what a pass that builds logits and a loss needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batches, args.batch, args.seq), generator=generator)
    batches = [{"input_ids": c.to(args.device), "attention_mask": torch.ones_like(c).to(args.device),
                "labels": c.to(args.device)} for c in ids]
    for size in (32000, 262144):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                 vocab_size=size, max_position_embeddings=max(4096, args.seq))
            model = LlamaForCausalLM(config).to(args.device).eval()
        settings = EvaConfig(rank=args.rank, rho=args.rho, max_batches=len(batches))
        with Memory(args.device) as start:
            pass
        with Memory(args.device) as mem, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sync(args.device)
            began = time.perf_counter()
            state = compute_eva_state(model, batches, settings, progress=False)
            sync(args.device)
            seconds = time.perf_counter() - began
        with Memory(args.device) as plain, torch.no_grad():
            model(**batches[0])
        base = start.peak_mb if args.device == "cuda" else start.rss.start / MB
        emit(case="vocab", vocab=size, device=args.device, hidden=args.hidden, layers=args.layers,
             tokens_per_batch=args.batch * args.seq, batches=state.n_batches, eva_seconds=round(seconds, 2),
             eva_peak_above_model_mb=round(mem.peak_mb - base, 1),
             one_forward_with_labels_peak_above_model_mb=round(plain.peak_mb - base, 1))
        del model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["plan", "measure", "vocab"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks at 8B widths (measure, vocab)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width (vocab)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--with-exact", action="store_true", help="also run the exact statistic (2 GB at 2 blocks)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-quality", action="store_true", help="no float64 reference (a quick smoke run)")
    args = parser.parse_args(argv)
    emit = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    {"plan": plan, "measure": measure, "vocab": vocab}[args.what](args, emit)


if __name__ == "__main__":
    sys.exit(main())
