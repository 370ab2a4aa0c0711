"""Benchmark machinery that verdicts rest on: bench_init's paired medians, the host-solve trial,
bench_floor's recorded rows and flop counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import bench_solves  # noqa: E402
from bench_floor import (  # noqa: E402
    Recorded,
    captured_forwards,
    exact_flops,
    recording,
    replay_exact,
    replay_sketch_floor,
    sketch_flops,
    truncated_forwards,
)
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


def test_the_floor_records_every_row_the_engine_absorbed_without_changing_its_result():
    """bench_floor replays what each statistic absorbed: the recording must hold each fed batch's
    kept tokens (48 of 64 per batch here: half the sequences lose their last 8 positions), one exit
    point per counted pass, and leave the engine's components exactly as they are without it."""
    model, batches = tiny_llama(), token_batches(VOCAB, 6)
    config = EvaConfig(rank=2, rho=1.0, tau=0.999, exact_max_dim=40, sketch_size=8, max_batches=6)
    baseline = compute_eva_state(model, batches, config, progress=False)
    run = Recorded()
    with recording(run):
        recorded = compute_eva_state(model, batches, config, progress=False)
    assert len(baseline.group_components) == len(recorded.group_components)
    for ours, theirs in zip(baseline.group_components, recorded.group_components):
        assert torch.equal(ours, theirs)
    # 2 blocks: q/k/v, o_proj, gate/up exact (width 32); down_proj a sketch (width 48) of size 8
    assert run.dtypes == dict.fromkeys(run.dtypes, torch.float32) and len(run.dtypes) == 6
    assert {r.shape[1] for _, r in run.exact} == {32}
    assert run.sizes == {k: 8 for k, _ in run.sketch} and len(run.sizes) == 2
    assert {r.shape for _, r in run.exact + run.sketch} <= {(48, 32), (48, 48)}
    first_group = [k for k, _ in run.exact].count(run.exact[0][0])
    assert first_group == recorded.n_batches  # the first group is fed every batch the run consumed
    assert len(run.exits) == recorded.n_batches


def test_a_truncated_plain_pass_stops_before_the_engines_exit_layer():
    model, batches = tiny_llama(), token_batches(VOCAB, 2)
    calls: list[str] = []
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj", "lm_head"):
        model.get_submodule(name).register_forward_hook(lambda *_, n=name: calls.append(n))
    truncated_forwards(model, batches, ["model.layers.1.mlp.down_proj", None])
    # pass 1 stops before down_proj (up_proj ran); pass 2 runs to the end
    assert calls == ["model.layers.1.mlp.up_proj"] + [
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ]


def test_captured_passes_stop_where_the_engine_stopped_and_leave_no_hooks():
    model, batches = tiny_llama(), token_batches(VOCAB, 2)
    calls: list[str] = []
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj", "lm_head"):
        model.get_submodule(name).register_forward_hook(lambda *_, n=name: calls.append(n))
    settings = dict(rank=2, rho=1.0, tau=0.99)
    seconds = captured_forwards(model, batches, ["model.layers.1.mlp.gate_proj", None], settings)
    assert len(seconds) == 2
    # the probe slice runs the whole model; pass 1 stops before gate_proj (so before up_proj, its
    # group's other layer, and down_proj); pass 2 runs to the end
    whole = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert calls == whole + whole
    for name in ("model.layers.0.self_attn.q_proj", "lm_head"):  # the capture's hooks are gone
        assert not model.get_submodule(name)._forward_pre_hooks


class _ProductFlops(TorchDispatchMode):
    """2 m n k for every matrix product torch runs (torch's FlopCounterMode skips in-place
    ``addmm_``, the exact update's product)."""

    PRODUCTS = {"addmm", "addmm_", "mm", "matmul"}

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            a, b = (args[1], args[2]) if name.startswith("addmm") else (args[0], args[1])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_the_floor_counts_the_flops_its_replays_perform():
    """exact_flops is what the replayed updates' products cost, block split included."""
    g = torch.Generator().manual_seed(0)
    exact = [(0, torch.randn(30, 24, generator=g)), (1, torch.randn(20, 16, generator=g))]
    for blocks in (None, 2, 3):
        with _ProductFlops() as counter:
            replay_exact(exact, blocks)
        assert counter.flops == exact_flops(exact, blocks)
    assert exact_flops(exact, None) == 2 * (30 * 24 * 24 + 20 * 16 * 16)  # narrow: one block
    sketch, sizes = [(0, exact[0][1]), (1, exact[1][1]), (0, exact[0][1])], {0: 5, 1: 3}
    with _ProductFlops() as counter:
        replay_sketch_floor(sketch, sizes)
    assert counter.flops == sketch_flops(sketch, sizes)


def test_the_two_block_trial_sums_the_same_second_moment_as_the_engine():
    g = torch.Generator().manual_seed(1)
    records = [(0, torch.randn(40, 24, generator=g) + 3.0) for _ in range(3)]
    _, engine = replay_exact(records, None)
    _, trial = replay_exact(records, 2)
    assert len(engine[0].blocks) == 1 and len(trial[0].blocks) == 2
    rows = torch.cat([r for _, r in records]).double()
    centred = rows - engine[0].shift
    reference = centred.T @ centred
    for acc in (engine[0], trial[0]):
        assert torch.allclose(acc.full_moment().double(), reference, rtol=1e-5, atol=1e-3)


def test_the_floor_summary_takes_the_median_of_per_round_ratios():
    from bench_floor import summarise

    parts = (
        "forward",
        "truncated",
        "captured",
        "exact",
        "exact_2_blocks",
        "sketch_floor",
        "engine",
    )
    rounds = [
        dict(zip(parts, (10.0, 9.0, 9.5, 1.0, 0.8, 0.3, 13.0))),  # floor 1.03, engine 1.3
        dict(zip(parts, (8.0, 7.2, 7.6, 0.8, 0.6, 0.2, 9.6))),  # floor 1.025, engine 1.2
        dict(zip(parts, (5.0, 4.8, 4.9, 0.6, 0.5, 0.2, 7.0))),  # floor 1.12, engine 1.4
    ]
    flops = {"forward": 20e9, "exact": 2e9}
    summary = summarise(rounds, flops)
    assert summary["floor_ratio"] == 1.03
    assert summary["floor_ratio_exact_2_blocks"] == 1.01  # 1.01, 1.0, 1.1
    assert summary["floor_ratio_with_capture"] == 1.08  # 1.08, 1.075, 1.14
    assert summary["engine_ratio"] == 1.3
    assert summary["engine_above_floor_with_capture"] == 0.22  # 0.22, 0.125, 0.26
    assert summary["share_of_plain_passes"]["exact"] == 0.1  # 0.1, 0.1, 0.12
    assert summary["gflop_per_s"] == {"forward": 2.5, "exact": 2.5}  # medians 8 s and 0.8 s


def test_bench_engines_imports_a_revisions_package_beside_the_checkouts(tmp_path):
    """engine_at reads the package as it was at a revision (here 99bb933, before the batched
    final solve) into a module of its own, so that two engines run in one process: a different
    module, loaded from the temporary folder, whose convergence module lacks what the checkout's
    has."""
    import subprocess

    import eva_lora
    from bench_engines import engine_at

    known = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "cat-file", "-e", "99bb933"],
        capture_output=True,
    )
    if known.returncode != 0:
        pytest.skip("a checkout without the history (no revision 99bb933)")
    old = engine_at("99bb933", tmp_path)
    assert old.__name__ == "eva_lora_99bb933" and old is not eva_lora
    assert Path(old.__file__).resolve().is_relative_to(tmp_path.resolve())
    assert callable(old.compute_eva_state)
    assert not hasattr(old.convergence, "final_eigenpairs")
    assert hasattr(eva_lora.convergence, "final_eigenpairs")


def test_bench_rule_half_reference_stops_no_later_and_restores_the_rule():
    """bench_rule's two readings of the loss on one stream: scaled to an exactly-half reference,
    every loss is at most the measured one, so the run stops no later (here earlier); both runs
    report whole-data captured variance in (0, 1] and leave the module's rule as it was. With
    ``feed_all`` every group absorbs every batch (same token count everywhere)."""
    import bench_rule
    from eva_lora import convergence

    model, batches = tiny_llama(), token_batches(VOCAB, 24)
    settings = dict(rank=2, rho=2.0, tau=0.99, exact_max_dim=40, sketch_size=8)
    covariances = bench_rule.exact_covariances(model, batches, settings)
    runs = {
        rule: bench_rule.measure(model, batches, settings, covariances, rule, 4.0, worst=2)
        for rule in ("doubling", "half")
    }
    fed = bench_rule.measure(model, batches, settings, covariances, "half", 4.0, 2, feed_all=True)
    assert (convergence.HALF_REFERENCE, convergence.EPSILON_SCALE) == (False, 4.0)
    # the early exit starves a group after it converges; fed every batch, all see the same tokens
    low, high = runs["half"]["tokens_min_max"]
    assert low < high
    assert fed["tokens_min_max"][0] == fed["tokens_min_max"][1]
    assert fed["feed"] == "all" and runs["half"]["feed"] == "default"
    # here strictly earlier: 14 against 17 passes (half: stops at 4-7 and 14; doubling: 4, 8, 13,
    # 16 and 17)
    assert runs["half"]["forward_passes"] < runs["doubling"]["forward_passes"]
    for record in runs.values():
        assert 0.0 < record["min"] <= record["mean"] <= 1.0 + 1e-9
        assert record["worst"][0]["captured"] == record["min"] and len(record["worst"]) == 2
        assert record["stop_batches"] and max(record["stop_batches"]) <= record["forward_passes"]
