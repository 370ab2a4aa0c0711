"""Where the convergence rule stops, and what each stop buys: passes against whole-data quality.

    python benchmarks/bench_rule.py --case minilm                      # ~2 min on 2 CPU cores
    python benchmarks/bench_rule.py --case smollm2 --scales 4,3,2      # ~8 min
    python benchmarks/bench_rule.py --case minilm --rules doubling     # today's rule only
    python benchmarks/bench_rule.py --case smollm2 --rules half --scales 1.6 --feed-all

The rule (:mod:`eva_lora.convergence`) compares each group's estimate with one made on at most half
of its tokens. Two readings of that loss, both measured here:

- ``doubling`` (the default, ``HALF_REFERENCE = False``): the loss as measured. The reference is a
  snapshot taken when the token count doubled, so it holds a half to a quarter of the tokens, and
  the loss *rises* between two snapshots (an estimate on ``m`` tokens reads ``c (1/m - 1/n)``
  against one on ``n``): a group passes, if at all, right after a doubling.
- ``half`` (``HALF_REFERENCE = True``): the loss times ``m / (n - m)``, what it would read against
  an estimate on exactly half the tokens (``c / n``), so that a group may stop at any check.

``--feed-all`` also feeds every converged group each batch (the pass then runs to the last target
layer: no early exit), a trial of what the last block's groups gain when they are not starved
after they converge (the engine's ``_EvaLoop._set_feeding`` is replaced for the run; the library
is not changed).

For each rule and each ``EPSILON_SCALE`` in ``--scales``, one ``compute_eva_state`` run on the case
(``minilm``: ``bench_init.py``'s MiniLM case, r 8, rho 2, its batches; ``smollm2``:
``bench_dropin.py``'s SmolLM2-135M on GSM8K questions, r 16, rho 2, all linear layers) prints one
JSON line: forward passes, the batches at which groups last met the rule (how the stops are
spread), and each layer's captured variance of the *whole* data set (every batch of the case, the
float64 exact PCA; ``trace(Q^T C Q)`` over the top-r eigenvalues, r the layer's rank): min, mean,
and the worst layers with their rank, tokens and stop batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dropin import data  # noqa: E402
from bench_init import build_case, exact_covariances  # noqa: E402
from eva_lora import EvaConfig, compute_eva_state, convergence, engine  # noqa: E402
from eva_lora.pca import captured_variance  # noqa: E402


def load(case: str) -> tuple[torch.nn.Module, list[dict], dict]:
    """(model, batches, EvaConfig settings) of a case."""
    if case == "minilm":
        return build_case("minilm", "cpu")
    model, loader = data("smollm2", 4, 256)
    batches = list(loader)
    return model, batches, dict(rank=16, rho=2.0, tau=0.99, target_modules="all-linear")


def _feed_every_group(loop: engine._EvaLoop) -> None:
    """The trial's feeding: every group absorbs every batch, converged or not (no early exit)."""
    for record in loop.groups:
        record.layer.active = True


def measure(
    model,
    batches,
    settings,
    covariances,
    rule: str,
    scale: float,
    worst: int,
    feed_all: bool = False,
) -> dict:
    """One run with ``rule`` at ``scale`` (the module's settings restored after it)."""
    defaults = convergence.HALF_REFERENCE, convergence.EPSILON_SCALE
    convergence.HALF_REFERENCE, convergence.EPSILON_SCALE = rule == "half", scale
    feeding = (
        mock.patch.object(engine._EvaLoop, "_set_feeding", _feed_every_group)
        if feed_all
        else contextlib.nullcontext()
    )
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        with feeding:
            state = compute_eva_state(
                model, batches, EvaConfig(**settings, max_batches=4 * len(batches)), progress=False
            )
        seconds = time.perf_counter() - start
    finally:
        convergence.HALF_REFERENCE, convergence.EPSILON_SCALE = defaults
    layers = []
    for index, names in enumerate(state.groups):
        for name in names:
            rank = state.ranks[name]
            if rank:
                rows = state.group_components[index][:rank].double()
                layers.append(
                    {
                        "layer": name,
                        "captured": round(captured_variance(covariances[name], rows), 5),
                        "rank": rank,
                        "tokens": state.group_tokens[index],
                        "stop_batch": state.group_stop_batches[index],
                        "statistic": state.group_statistics[index],
                    }
                )
    layers.sort(key=lambda layer: layer["captured"])
    scores = [layer["captured"] for layer in layers]
    tokens = [layer["tokens"] for layer in layers]
    return {
        "rule": rule,
        "epsilon_scale": scale,
        "feed": "all" if feed_all else "default",
        "forward_passes": state.n_batches,
        "stop_reason": state.stop_reason,
        "seconds": round(seconds, 1),
        "stop_batches": sorted({b for b in state.group_stop_batches if b is not None}),
        "min": scores[0],
        "mean": round(sum(scores) / len(scores), 5),
        "layers": len(scores),
        "tokens_min_max": [min(tokens), max(tokens)],
        "worst": layers[:worst],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--rules", default="doubling,half", help="comma-separated: doubling, half")
    parser.add_argument("--scales", default="4,3,2.5,2", help="comma-separated EPSILON_SCALEs")
    parser.add_argument("--worst", type=int, default=3, help="worst layers listed per run")
    parser.add_argument(
        "--feed-all", action="store_true", help="feed every converged group too (no early exit)"
    )
    args = parser.parse_args(argv)
    rules = [r for r in args.rules.split(",") if r]
    unknown = set(rules) - {"doubling", "half"}
    if unknown:
        parser.error(f"unknown rule(s) {sorted(unknown)}: choose doubling, half")
    scales = [float(v) for v in args.scales.split(",") if v]
    model, batches, settings = load(args.case)
    covariances = exact_covariances(model, batches, settings)  # every batch of the case
    for rule in rules:
        for scale in scales:
            record = measure(
                model, batches, settings, covariances, rule, scale, args.worst, args.feed_all
            )
            print(json.dumps({"case": args.case, **record}), flush=True)


if __name__ == "__main__":
    main()
