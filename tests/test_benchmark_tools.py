"""Benchmark machinery that verdicts rest on: bench_init's paired medians, the host-solve trial."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_solves  # noqa: E402
from bench_init import _timing_record  # noqa: E402
from bench_solves import host_solves, solve_on_host  # noqa: E402
from eva_lora import EvaConfig, compute_eva_state  # noqa: E402
from eva_lora import engine as engine_module  # noqa: E402
from eva_lora import statistics as statistics_module  # noqa: E402
from eva_lora.convergence import oversampled  # noqa: E402
from helpers import VOCAB, tiny_llama, token_batches  # noqa: E402


def _pair(seconds: float, passes: int, plain: float, peak_mb: float = 10.0) -> tuple[tuple, float]:
    return (seconds, passes, peak_mb, {}), plain


def test_the_overhead_is_the_median_of_the_paired_ratios_not_a_ratio_of_sums():
    # ratios 1.5, 1.1, 1.2: median 1.2; the ratio of the sums would be 12.2 / 10 = 1.22
    record = _timing_record([_pair(3.0, 42, 2.0), _pair(5.5, 42, 5.0), _pair(3.6, 42, 3.0)])
    assert record["overhead_ratios"] == [1.5, 1.1, 1.2]
    assert record["overhead_ratio"] == 1.2
    assert record["forward_passes"] == 42
    assert record["seconds"] == [3.0, 5.5, 3.6]
    assert record["plain_forward_seconds"] == [2.0, 5.0, 3.0]


def test_the_peak_memory_is_the_largest_of_the_repeats():
    record = _timing_record([_pair(1.0, 3, 1.0, 70.0), _pair(1.0, 3, 1.0, 78.5)])
    assert record["peak_rss_mb"] == 78.5


def test_repeats_that_consumed_different_batches_are_refused():
    with pytest.raises(RuntimeError, match=r"forward passes differ between repeats: \[42, 43\]"):
        _timing_record([_pair(1.0, 42, 1.0), _pair(1.0, 43, 1.0)])


def test_a_stack_solved_on_the_host_matches_the_direct_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 40, generator=g, dtype=torch.float64)
    stack = x @ x.transpose(1, 2)
    values, vectors = solve_on_host(stack)
    direct_values, _ = torch.linalg.eigh(stack)
    assert torch.allclose(values, direct_values, rtol=1e-12, atol=0)
    reconstructed = vectors @ torch.diag_embed(values) @ vectors.transpose(1, 2)
    assert torch.allclose(reconstructed, stack, rtol=0, atol=1e-9 * float(stack.abs().max()))


def test_the_host_solve_trial_carries_both_solvers_checks_and_restores_the_engine(monkeypatch):
    """The exact groups' Ritz steps (engine) and the sketches' windows (statistics) both go through
    the trial's host path, stacked per size, and afterwards each module calls its own solver
    again; on a CPU the trial computes exactly what the engine does."""
    sizes: list[tuple[int, int]] = []  # (stacked problems, width) per host solve
    real = bench_solves.solve_on_host

    def counting(stack):
        sizes.append((stack.shape[0], stack.shape[-1]))
        return real(stack)

    monkeypatch.setattr(bench_solves, "solve_on_host", counting)
    engine_solver, sketch_solver = engine_module.batched_eigh, statistics_module.batched_eigh
    model, batches = tiny_llama(), token_batches(VOCAB, 6)
    # q/k/v, o_proj and gate/up (width 32) exact; down_proj (width 48) a sketch of 8 directions
    config = EvaConfig(rank=2, rho=1.0, tau=0.999, exact_max_dim=40, sketch_size=8, max_batches=6)
    baseline = compute_eva_state(model, batches, config, progress=False)
    assert sizes == []
    with host_solves():
        assert engine_module.batched_eigh is statistics_module.batched_eigh
        assert engine_module.batched_eigh is not engine_solver
        trial = compute_eva_state(model, batches, config, progress=False)
    assert engine_module.batched_eigh is engine_solver
    assert statistics_module.batched_eigh is sketch_solver
    assert set(trial.group_statistics) == {"exact", "sketch"}
    ritz = oversampled(2, 32)  # the exact groups' Rayleigh-Ritz block: 10 wide
    exact_groups = trial.group_statistics.count("exact")
    assert (exact_groups, ritz) in sizes  # the engine's call: all exact groups in one stack
    sketch_groups = trial.group_statistics.count("sketch")
    # the sketches' first window: 8 random + 8 powered directions; later windows 25 new, 33 wide
    assert {(sketch_groups, 16), (sketch_groups, 25), (sketch_groups, 33)} <= set(sizes)
    for ours, theirs in zip(baseline.group_components, trial.group_components):
        assert torch.equal(ours, theirs)
