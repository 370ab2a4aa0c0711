"""EVA at 8B-70B scale: planned memory and flops per method, and measured cost at 8B widths.

    # (a) Llama-3-8B / 70B, meta device, 1 and 8 ranks
    python benchmarks/bench_scale.py plan
    # (b) 8B widths, 2 blocks, 12 batches of 2 x 128
    python benchmarks/bench_scale.py measure
    python benchmarks/bench_scale.py measure --batch 4 --seq 512  # (b) the same at 4 x 512
    # (c) on a GPU
    python benchmarks/bench_scale.py measure --device cuda --layers 8 --batch 4 --seq 512
    # (d) EVA's peak memory vs the vocabulary size
    python benchmarks/bench_scale.py vocab
    # (e) 8B widths from disk: sequential vs whole, float and a 4-bit (QLoRA) base
    python benchmarks/bench_scale.py sequential --layers 8
    python benchmarks/bench_scale.py sequential --layers 8 --load-in-4bit nf4
    # (f) Llama-3-8B / 70B on one 24 / 48 / 80 GB GPU
    python benchmarks/bench_scale.py plan-sequential

``plan`` builds the model on the meta device (no weights), runs one probe pass to find the input
groups (q/k/v and gate/up share one), and prints for each method the statistic memory per rank (the
largest rank) and the multiply-adds per token, next to the forward pass's. ``measure`` runs, in one
process and on the same batches: plain forward passes, eva-lora (statistics="auto", which is a
sketch at these widths; and statistics="exact", the previous design), and PEFT's
``get_eva_state_dict``; every group is kept active for every batch (tau close to 1). Quality is the
captured variance of each group's components against the float64 PCA of exactly the tokens that
group absorbed. ``sequential`` writes a random Llama at 8B widths (bf16 safetensors, one shard per
block) and runs EVA on it twice, each in its own process: sequential (weights read block by block,
``empty_model_from_folder``) and whole-model (``from_pretrained``), on the same tokens (tau = 1:
both absorb every batch); it prints each one's peak resident memory, the formula's prediction, and
how far the two results agree; with ``--load-in-4bit`` both use a bitsandbytes 4-bit base
(sequential quantises each block as it reads it, whole-model loads with ``quantization_config``).
``plan-sequential`` prints the formula for the real models. Each line of output is one JSON record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_init import PeakRSS, minilm_path, sentences  # noqa: E402
from bench_solves import host_solves  # noqa: E402
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
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers or blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab or vocab_size,
        max_position_embeddings=4096,
    )


# ---- (a) plan ------------------------------------------------------------------------------------
def meta_groups(
    name: str, settings: EvaConfig
) -> tuple[list[list[str]], list[int], dict[str, list[int]]]:
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
                plans = plan_statistics(
                    dims, EvaConfig(rank=args.rank, rho=args.rho, statistics=method), world
                )
                per_rank = rank_loads(plans, dims, size, world)  # held + the largest single update
                macs = sum(
                    exact_macs(d) if p.kind == "exact" else sketch_macs(d, size)
                    for p, d in zip(plans, dims)
                )
                emit(
                    model=name,
                    method=f"eva-lora {method}",
                    ranks=world,
                    groups=len(groups),
                    stat_mb_per_rank=round(max(per_rank) / MB, 1),
                    stat_macs_per_token=macs,
                    over_forward=round(macs / forward, 4),
                    batched_eigh_per_check=2 * any(p.kind == "sketch" for p in plans),
                    sketch_size=size if method != "exact" else None,
                )
            # PEFT: an IncrementalPCA of k components per distinct input on every rank; each step
            # stacks (rows + k + 1) x d and runs svd_lowrank(q=2k, niter=4); under torch.distributed
            # every layer's rows are all-gathered to every rank first.
            persistent = sum(k * d * 4 + 8 * d for d in dims)
            widest = max(dims)
            transient = (world * tokens + k + 1) * widest * 4 * 3
            macs = sum(10 * 2 * k * d for d in dims)
            emit(
                model=name,
                method="peft ipca",
                ranks=world,
                groups=len(groups),
                stat_mb_per_rank=round(persistent / MB, 1),
                transient_mb=round(transient / MB, 1),
                stat_macs_per_token=macs,
                over_forward=round(macs / forward, 4),
                gathered_rows_mb_per_layer=round(world * tokens * widest * 4 / MB, 1)
                if world > 1
                else 0,
            )
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
    batches = [
        {"input_ids": c.to(args.device), "attention_mask": torch.ones_like(c).to(args.device)}
        for c in ids
    ]
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
    """PEFT's get_eva_state_dict over exactly ``len(batches)`` passes.

    Its per-layer IPCA is read from its hooks."""
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_eva_state_dict
    from peft.tuners.lora import eva as peft_eva

    calls, hooks = [0], []
    original_init = peft_eva.SVDHook.__init__

    # keep every hook, also those PEFT removes once converged
    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        hooks.append(self)

    def forward(m, batch):
        calls[0] += 1
        if calls[0] > len(batches) + 1:  # PEFT's first pass only hashes inputs, as our probe
            raise _Enough
        return m(**batch)

    targets = sorted(find_target_layers(model, EvaConfig(**settings)))
    cfg = LoraConfig(
        r=settings["rank"],
        target_modules=targets,
        eva_config=PeftEvaConfig(rho=settings["rho"], tau=0.99999999),
    )
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
    comps = {
        h.name: h.svd.components_.detach().float().cpu()
        for h in hooks
        if hasattr(h.svd, "components_")
    }
    tokens = {
        h.name: int(h.svd.n_samples_seen_) for h in hooks if hasattr(h.svd, "n_samples_seen_")
    }
    return seconds, mem.peak_mb, comps, tokens


def exact_reference(
    model, batches, settings: dict, k: int
) -> list[tuple[list[str], torch.Tensor, float]]:
    """Per group: (names, float64 covariance of all tokens of ``batches``, top-k eigenvalue sum).

    Every method keeps every group active for every batch here, so one reference serves them all.
    """
    out = []
    for group in collect_statistics(model, batches, EvaConfig(**settings, stats_dtype="float64")):
        # stays where the model is: a 14336-wide eigvalsh is slow on a CPU
        cov = group.stats.covariance()
        values = torch.linalg.eigvalsh(cov if cov.device.type == "cpu" else cov.float())
        out.append((group.names, cov, float(values[-k:].double().sum())))
    return out


def quality(
    reference, comps: dict[str, torch.Tensor], tokens: dict[str, int], total: int, k: int
) -> tuple[dict[str, float], list[str]]:
    """Captured variance of each group's top-k rows against the float64 PCA of every token, for the
    groups that absorbed every token; and the groups that stopped early (their rank fell to 0, so
    the method stopped feeding them, as the paper's algorithm does), which the reference does not
    describe."""
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
    emit(
        event="setup",
        device=args.device,
        layers=args.layers,
        batches=len(batches),
        batch=args.batch,
        seq=args.seq,
        threads=torch.get_num_threads(),
        **settings,
    )
    plain_forwards(model, batches[:2], args.device)  # warm-up
    results = {}
    plain = contextlib.nullcontext
    runs = [
        ("eva-lora auto", {}, plain),
        ("eva-lora auto, no early exit", {"early_exit": False}, plain),
    ]
    # TF32 for the statistics' products (off by default), fewer checks, and the checks' small
    # eigenproblems solved on the host (a trial patch: see bench_solves.py)
    if args.device == "cuda":
        runs += [
            ("eva-lora auto, statistics_tf32", {"statistics_tf32": True}, plain),
            ("eva-lora auto, check_every=3", {"check_every": 3}, plain),
            ("eva-lora auto, small solves on the host (trial patch)", {}, host_solves),
        ]
    else:
        runs.append(("eva-lora sketch_size=128", {"sketch_size": 128}, plain))
    if args.with_exact:
        runs.append(("eva-lora exact", {"statistics": "exact"}, plain))

    def around(run):  # plain passes before and after each run: the machine drifts
        (before, plain_peak), out, (after, _) = (
            plain_forwards(model, batches, args.device),
            run(),
            plain_forwards(model, batches, args.device),
        )
        seconds, peak = out[0], out[1]
        return out, {
            "seconds": round(seconds, 2),
            "plain_forward_seconds": [round(before, 2), round(after, 2)],
            "overhead": round(2 * seconds / (before + after), 3),
            "peak_mb": round(peak, 1),
            "plain_peak_mb": round(plain_peak, 1),
            "extra_peak_mb": round(peak - plain_peak, 1),
        }

    for label, extra, patch in runs:

        def patched_run(extra=extra, patch=patch):
            with patch():
                return run_ours(model, batches, {**settings, **extra}, args.device)

        (seconds, peak, comps, tokens, state), row = around(patched_run)
        emit(
            method=label,
            **row,
            statistics=sorted(set(state.group_statistics)),
            statistic_mb=round(state.history[-1]["statistic_bytes"] / MB, 1),
            forward_passes=len(batches),
        )
        results[label] = (comps, tokens)
    if not args.skip_peft:
        try:
            (seconds, peak, comps, tokens), row = around(
                lambda: run_peft(model, batches, settings, args.device)
            )
        # PEFT's EVA on this dtype / device: report and go on to the quality
        except Exception as err:
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
        emit(
            method=label,
            quality="captured variance vs exact PCA of the same tokens (groups fed every batch)",
            min=min(scores.values()),
            per_group=scores,
            stopped_early=stopped,
        )


# ---- (d) vocabulary ---------------------------------------------------------------------------
def vocab(args: argparse.Namespace, emit) -> None:
    """Two Llamas that differ only in vocabulary size (32k, 262k), the same token batches (with
    labels, as a fine-tuning batch has): peak memory above the loaded model of EVA, and of one plain
    forward pass with those labels (what a pass that builds logits and a loss needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batches, args.batch, args.seq), generator=generator)
    batches = [
        {
            "input_ids": c.to(args.device),
            "attention_mask": torch.ones_like(c).to(args.device),
            "labels": c.to(args.device),
        }
        for c in ids
    ]
    for size in (32000, 262144):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            config = LlamaConfig(
                hidden_size=args.hidden,
                intermediate_size=args.hidden * 11 // 4,
                num_hidden_layers=args.layers,
                num_attention_heads=8,
                num_key_value_heads=8,
                vocab_size=size,
                max_position_embeddings=max(4096, args.seq),
            )
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
        emit(
            case="vocab",
            vocab=size,
            device=args.device,
            hidden=args.hidden,
            layers=args.layers,
            tokens_per_batch=args.batch * args.seq,
            batches=state.n_batches,
            eva_seconds=round(seconds, 2),
            eva_peak_above_model_mb=round(mem.peak_mb - base, 1),
            one_forward_with_labels_peak_above_model_mb=round(plain.peak_mb - base, 1),
        )
        del model


# ---- (e) sequential, (f) its plan ----------------------------------------------------------------
GB = 2**30
# the allowance for the Python runtime, torch and transformers, as the issue sets it
RUNTIME_GB = 1.0


def sequential_peak(
    block_bytes: float, embedding_bytes: float, cache_bytes: float, stat_bytes: float
) -> float:
    """Bytes sequential EVA holds at its peak, without the runtime, with the weights read from disk:
    the larger of the embeddings' pass (their weights and the cache of their outputs) and a block's
    (the block, the hidden states of the calibration set three times: the embeddings' output, the
    block's inputs and its outputs), plus the statistics of one block's groups. The head, read for
    its own pass at the end, is as large as the embeddings. ``cache_bytes`` is 0 for the device when
    the caches wait on the CPU."""
    return max(embedding_bytes + cache_bytes, block_bytes + 3 * cache_bytes) + stat_bytes


def block_sizes(config, bytes_per_param: float) -> tuple[float, float]:
    """(one decoder block, everything outside the blocks) in bytes for a Llama config."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    head_dim = h // config.num_attention_heads
    block = 2 * h * h + 2 * h * kv * head_dim + 3 * h * i
    outer = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return block * bytes_per_param + 2 * h * 2, outer * bytes_per_param + h * 2


def block_statistics_bytes(config, settings: EvaConfig) -> float:
    """One Llama block's statistics: input groups q/k/v, o, gate/up (hidden wide) and down."""
    groups = [config.hidden_size] * 3 + [config.intermediate_size]
    plans = plan_statistics(groups, settings, 1)
    return float(rank_loads(plans, groups, settings.resolved_sketch_size, 1)[0])


def plan_sequential(args: argparse.Namespace, emit) -> None:
    settings = EvaConfig(rank=args.rank, rho=args.rho)
    tokens = args.batches * args.batch * args.seq
    for name in CONFIGS:
        config = llama_config(name)
        # 4 bits + a scale per 64
        for dtype, per_param in (("bf16", 2.0), ("nf4", 0.5 + 0.5 / 64 * 4 / 2)):
            block, outer = block_sizes(config, per_param)
            # bitsandbytes keeps embeddings and the head in the compute dtype
            embeddings = config.vocab_size * config.hidden_size * 2.0
            reading = 0.0
            if dtype == "nf4":
                outer = block_sizes(config, 2.0)[1]
                # a float checkpoint's weight is quantised on the device, one at a time
                reading = config.hidden_size * config.intermediate_size * 2.0
            # bf16 hidden states, offloaded to the CPU by default
            cache = tokens * config.hidden_size * 2
            stats = block_statistics_bytes(config, settings)
            # one batch in the MLP, fp32
            activations = 2 * args.batch * args.seq * config.intermediate_size * 4
            on_device = sequential_peak(block + reading, embeddings, 0, stats) + activations
            whole_gb = (block * config.num_hidden_layers + outer) / GB
            for gpu in (24, 48, 80):
                emit(
                    model=name,
                    dtype=dtype,
                    gpu_gb=gpu,
                    calibration_tokens=tokens,
                    block_gb=round(block / GB, 2),
                    outside_blocks_gb=round(outer / GB, 2),
                    embeddings_gb=round(embeddings / GB, 2),
                    block_statistics_gb=round(stats / GB, 2),
                    cpu_cache_gb=round(3 * cache / GB, 2),
                    sequential_device_peak_gb=round(on_device / GB, 2),
                    fits=on_device / GB + RUNTIME_GB <= gpu,
                    whole_model_weights_gb=round(whole_gb, 1),
                    whole_model_fits=whole_gb + RUNTIME_GB <= gpu,
                )


def write_synthetic(folder: Path, layers: int, vocab: int) -> int:
    """A random Llama at 8B widths as bf16 safetensors, one shard per block, written without ever
    holding more than one block: returns the bytes on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config("llama-3-8b", layers, vocab)
    config.torch_dtype = "bfloat16"
    config.save_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        key = name.split(".")[2] if name.startswith("model.layers.") else "outer"
        shards.setdefault(key, {})[name] = param
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for key, params in shards.items():
        file = f"model-{key}.safetensors"
        tensors = {
            n: (
                torch.ones(p.shape)
                if n.endswith("norm.weight")
                else torch.randn(p.shape, generator=generator) * 0.02
            ).to(torch.bfloat16)
            for n, p in params.items()
        }
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def rss_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sequential(args: argparse.Namespace, emit) -> None:
    import subprocess
    import tempfile

    folder = (
        Path(args.folder or tempfile.mkdtemp(prefix="eva-8b-")) / f"llama-8b-widths-{args.layers}"
    )
    if not (folder / "model.safetensors.index.json").exists():
        began = time.perf_counter()
        disk = write_synthetic(folder, args.layers, args.vocab)
        emit(
            step="write", seconds=round(time.perf_counter() - began, 1), disk_mb=round(disk / MB, 1)
        )
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    records = {}
    for mode in ("sequential", "whole"):
        command = [
            sys.executable,
            __file__,
            "sequential-child",
            "--mode",
            mode,
            "--folder",
            str(folder),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--batches",
            str(args.batches),
            "--rank",
            str(args.rank),
            "--rho",
            str(args.rho),
            *(["--load-in-4bit", args.load_in_4bit] if args.load_in_4bit else []),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        records[mode] = json.loads(out.strip().splitlines()[-1])
        emit(
            **records[mode],
            model_on_disk_mb=round(disk / MB, 1),
            disk_over_peak=round(disk / MB / records[mode]["peak_rss_mb"], 2),
        )
    from eva_lora import EvaState

    a, b = (EvaState.load(state_folder(folder, m, args)) for m in ("sequential", "whole"))
    mine = {tuple(g): c for g, c in zip(a.groups, a.group_components)}
    theirs = {tuple(g): c for g, c in zip(b.groups, b.group_components)}
    cos = torch.cat([(mine[k] * theirs[k]).sum(1).abs() for k in mine])
    emit(
        agreement="|cos| per component, sequential vs whole-model",
        load_in_4bit=args.load_in_4bit,
        min=round(float(cos.min()), 6),
        mean=round(float(cos.mean()), 6),
        same_ranks=a.ranks == b.ranks,
        seconds_ratio=round(records["sequential"]["seconds"] / records["whole"]["seconds"], 2),
        peak_ratio=round(records["sequential"]["peak_rss_mb"] / records["whole"]["peak_rss_mb"], 3),
    )


def state_folder(folder: Path, mode: str, args: argparse.Namespace) -> Path:
    return folder.parent / f"state-{mode}{'-' + args.load_in_4bit if args.load_in_4bit else ''}"


def quantised_block_bytes(config) -> tuple[float, float]:
    """(one 4-bit block, what quantising its largest weight holds) in bytes: bitsandbytes keeps 4
    bits and a float32 absmax per 64 weights; while a block is read, one float weight at a time is
    quantised, and bitsandbytes 0.50.2's CPU quantiser holds about 10 bytes per weight meanwhile
    (measured: +580 MB of peak for one bf16 14336 x 4096 matrix)."""
    h, i = config.hidden_size, config.intermediate_size
    block, _ = block_sizes(config, 0.5 + 4 / 64)
    return block, h * i * 10


def sequential_child(args: argparse.Namespace, emit) -> None:
    from transformers import AutoConfig, LlamaForCausalLM

    from eva_lora.disk_weights import empty_model_from_folder
    from eva_lora.sequential import SequentialOptions

    torch.manual_seed(0)
    folder = Path(args.folder)
    config = AutoConfig.from_pretrained(folder)
    start = rss_mb("VmRSS")
    batches = [
        {
            "input_ids": torch.randint(0, config.vocab_size, (args.batch, args.seq)),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        }
        for _ in range(args.batches)
    ]
    settings = EvaConfig(rank=args.rank, rho=args.rho, tau=1.0, max_batches=args.batches)
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.mode == "sequential":
            model, weights = empty_model_from_folder(
                folder, torch.bfloat16, load_in_4bit=args.load_in_4bit
            )
            state = compute_eva_state(
                model,
                batches,
                settings,
                progress=False,
                sequential=SequentialOptions(weights=weights, calibration_batches=args.batches),
            )
        else:
            quantised = {}
            if args.load_in_4bit:
                from transformers import BitsAndBytesConfig

                quantised = dict(
                    quantization_config=BitsAndBytesConfig(
                        load_in_4bit=True,
                        bnb_4bit_quant_type=args.load_in_4bit,
                        bnb_4bit_compute_dtype=torch.bfloat16,
                    ),
                    device_map="cpu",
                )
            model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **quantised)
            state = compute_eva_state(model, batches, settings, progress=False)
    seconds = time.perf_counter() - began
    state.save(state_folder(folder, args.mode, args))
    block, outer = block_sizes(config, 2.0)
    embeddings = config.vocab_size * config.hidden_size * 2
    if args.load_in_4bit:
        quantised_block, reading = quantised_block_bytes(config)
        block = quantised_block + reading
    cache = args.batches * args.batch * args.seq * config.hidden_size * 2
    stats = max(h["statistic_bytes"] for h in state.history) if state.history else 0
    # on a CPU the finished blocks' statistics stay in the same memory until the allocation at the
    # end (on a GPU they leave the device): all but the running block's
    finished = stats * (config.num_hidden_layers - 1)
    predicted = start + (sequential_peak(block, embeddings, cache, stats) + finished) / MB
    emit(
        mode=args.mode,
        load_in_4bit=args.load_in_4bit,
        seconds=round(seconds, 1),
        peak_rss_mb=round(rss_mb(), 1),
        start_rss_mb=round(start, 1),
        block_mb=round(block / MB, 1),
        outside_blocks_mb=round(outer / MB, 1),
        cache_mb=round(cache / MB, 1),
        block_statistics_mb=round(stats / MB, 1),
        formula_mb=round(predicted, 1) if args.mode == "sequential" else None,
        batches=state.n_batches,
        tokens=state.n_tokens,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what",
        choices=["plan", "measure", "vocab", "sequential", "plan-sequential", "sequential-child"],
    )
    parser.add_argument(
        "--folder", help="sequential: where the synthetic model is written (default: a temp folder)"
    )
    parser.add_argument(
        "--vocab", type=int, default=32000, help="sequential: vocabulary of the synthetic model"
    )
    parser.add_argument("--mode", choices=["sequential", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder blocks at 8B widths (measure, vocab)"
    )
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width (vocab)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument(
        "--with-exact", action="store_true", help="also run the exact statistic (2 GB at 2 blocks)"
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--load-in-4bit",
        choices=["nf4", "fp4"],
        help="sequential: a bitsandbytes 4-bit base in both modes (QLoRA)",
    )
    parser.add_argument(
        "--skip-quality", action="store_true", help="no float64 reference (a quick smoke run)"
    )
    args = parser.parse_args(argv)
    emit = lambda **kw: print(json.dumps(kw), flush=True)  # noqa: E731
    {
        "plan": plan,
        "measure": measure,
        "vocab": vocab,
        "sequential": sequential,
        "plan-sequential": plan_sequential,
        "sequential-child": sequential_child,
    }[args.what](args, emit)


if __name__ == "__main__":
    sys.exit(main())
