"""Numerical core against a float64 reference (torch.linalg.eigh of the exact covariance)."""

import copy

import pytest
import torch

from eva_lora.convergence import ComponentTracker, make_solver
from eva_lora.pca import (
    CovarianceAccumulator,
    block_bounds,
    captured_variance,
    component_cosine,
    exact_eigenpairs,
)
from eva_lora.statistics import ExactStatistic


def planted(n: int, d: int, k: int, seed: int, mean: float = 0.0) -> torch.Tensor:
    """Rows with a planted spectrum: k strong directions (variance 100 ... 10) over unit noise."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.ones(d, dtype=torch.float64)
    scales[:k] = torch.linspace(10.0, 3.2, k, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T + mean


@pytest.mark.parametrize("dim", [7, 384, 600, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_update_equals_one_shot_covariance(dim, dtype):
    x = planted(900, dim, 5, seed=dim, mean=3.0)
    acc = CovarianceAccumulator(dim, dtype=dtype)
    for chunk in x.split(128):
        acc.update(chunk)
    reference = torch.cov(x.T)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert acc.count == 900
    assert torch.allclose(acc.covariance(), reference, atol=tol * reference.abs().max())
    assert torch.allclose(acc.mean(), x.mean(0), atol=1e-6)
    assert acc.total_variance() == pytest.approx(float(reference.trace()), rel=1e-5)


def test_block_bounds_cover_dimension():
    for dim in (1, 511, 512, 1023, 1024, 4097):
        bounds = block_bounds(dim)
        assert bounds[0][0] == 0 and bounds[-1][1] == dim
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_covariance_product_matches_dense_product():
    x = planted(500, 1100, 6, seed=1, mean=-2.0)
    acc = CovarianceAccumulator(1100, dtype=torch.float64)
    acc.update(x)
    q = torch.randn(1100, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(acc.covariance_product(q), torch.cov(x.T) @ q, atol=1e-9)


def test_merge_in_any_order_equals_single_pass():
    x = planted(700, 40, 4, seed=2, mean=50.0)
    parts = [x[:100], x[100:450], x[450:]]
    merged = CovarianceAccumulator(40, dtype=torch.float64)
    for part in reversed(parts):
        acc = CovarianceAccumulator(40, dtype=torch.float64)
        acc.update(part)
        merged.merge(acc)
    assert merged.count == 700
    assert torch.allclose(merged.covariance(), torch.cov(x.T), atol=1e-9)


def test_state_dict_round_trip():
    x = planted(300, 600, 3, seed=3)
    acc = CovarianceAccumulator(600)
    acc.update(x)
    again = CovarianceAccumulator.from_state_dict(acc.state_dict())
    assert again.count == 300
    assert torch.equal(again.covariance(), acc.covariance())


def test_large_mean_does_not_destroy_precision():
    # float32 products of raw rows with mean 1e4 lose everything; the shift keeps ~1e-4 accuracy.
    x = planted(2000, 30, 3, seed=4, mean=1e4)
    acc = CovarianceAccumulator(30, dtype=torch.float32)
    for chunk in x.split(250):
        acc.update(chunk)
    ref = torch.cov(x.T)
    assert (acc.covariance() - ref).abs().max() / ref.abs().max() < 1e-4


def test_update_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"expected rows of shape \(n, 8\)"):
        CovarianceAccumulator(8).update(torch.zeros(3, 9))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_recovers_planted_components(seed):
    d, k = 600, 12
    x = planted(4000, d, k, seed=seed)
    acc = ExactStatistic(d)
    tracker = ComponentTracker(k, make_solver("exact", k, d, seed))
    for chunk in x.split(400):
        acc.update(chunk)
        tracker.check(acc, tau=0.99)
    pairs = tracker.finalize(acc)
    cov = torch.cov(x.T)
    exact = exact_eigenpairs(cov, k)
    assert captured_variance(cov, pairs.vectors) >= 0.999
    assert component_cosine(exact.vectors, pairs.vectors.double()).min() >= 0.99
    assert torch.allclose(pairs.values, exact.values, rtol=1e-3)
    assert all(tracker.converged)


def test_tracker_is_deterministic_and_leaves_global_rng_alone():
    x = planted(1500, 520, 6, seed=5)
    torch.manual_seed(123)
    before = torch.rand(1)
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        acc, tracker = ExactStatistic(520), ComponentTracker(6, make_solver("exact", 6, 520, 7))
        for chunk in x.split(300):
            acc.update(chunk)
            tracker.check(acc, 0.99)
        results.append(tracker.finalize(acc).vectors)
        assert torch.equal(torch.rand(1), before)  # the solver drew nothing from the global RNG
    assert torch.equal(results[0], results[1])


def test_captured_variance_is_one_for_exact_and_lower_for_random():
    cov = torch.cov(planted(800, 50, 5, seed=6).T)
    assert captured_variance(cov, exact_eigenpairs(cov, 5).vectors) == pytest.approx(1.0, abs=1e-12)
    random_rows = torch.randn(
        5, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert captured_variance(cov, random_rows) < 0.5


def _checked_groups(widths, k, seed=0, rows=3000, checked=None):
    """(solvers, statistics, rows) of groups of the given widths, each checked on its first
    ``checked[i]`` rows (default half) so that its solver holds a warm basis, then fed the rest
    (as a converged group still fed is at the end of the EVA loop): the less it was checked, the
    more iterations its final solve needs."""
    solvers, stats, data = [], [], []
    for index, d in enumerate(widths):
        x = planted(rows, d, k, seed=seed + index, mean=0.5)
        stat = ExactStatistic(d)
        tracker = ComponentTracker(k, make_solver("exact", k, d, seed))
        seen = rows // 2 if checked is None else checked[index]
        for chunk in x[:seen].split(rows // 6):
            stat.update(chunk)
            tracker.check(stat, tau=0.99)
        stat.update(x[seen:])
        solvers.append(tracker.solver)
        stats.append(stat)
        data.append(x)
    return solvers, stats, data


def test_the_batched_final_solve_meets_the_float64_reference_for_every_group():
    """final_eigenpairs iterates groups of one width together (and a tiny group and one of
    another width beside them): every group's components capture the float64 PCA's variance to
    1e-6, its eigenvalues match to 1e-4, and its residuals meet FINAL_SLACK, as one group's own
    final solve does."""
    from eva_lora.convergence import FINAL_SLACK, final_eigenpairs

    k = 8
    # the first group's basis is already converged, the others' need 1 to ~10 iterations: groups
    # leave the stack at different iterations
    solvers, stats, data = _checked_groups(
        [300, 300, 300, 12, 200], k, checked=[3000, 500, 1500, 3000, 1000]
    )
    pairs = final_eigenpairs(solvers, stats)
    for found, x in zip(pairs, data):
        cov = torch.cov(x.T)
        exact = exact_eigenpairs(cov, k)
        assert found.vectors.shape == (k, x.shape[1])
        assert captured_variance(cov, found.vectors) >= 1 - 1e-6
        torch.testing.assert_close(found.values, exact.values, rtol=1e-4, atol=0)
        assert (found.residuals <= FINAL_SLACK * found.values.abs()).all()


def test_a_group_short_of_the_residual_after_the_iterations_gets_the_exact_solve(monkeypatch):
    """With the iteration limit cut to one, the groups whose first Rayleigh-Ritz step misses
    FINAL_SLACK fall back to the exact eigh (zero residuals), and the answers still match."""
    from eva_lora import convergence

    calls = []
    exact = convergence.exact_eigenpairs

    def counted(cov, k):
        calls.append(cov.shape[0])
        return exact(cov, k)

    monkeypatch.setattr(convergence, "exact_eigenpairs", counted)
    original = convergence._iterate_together

    def one_iteration(solvers, stats, k, dtype, max_iter=None):
        return original(solvers, stats, k, dtype, max_iter=1)

    monkeypatch.setattr(convergence, "_iterate_together", one_iteration)
    k = 8
    solvers, stats, data = _checked_groups([300, 300], k)
    pairs = convergence.final_eigenpairs(solvers, stats)
    assert calls == [300, 300]
    for found, x in zip(pairs, data):
        assert torch.equal(found.residuals, torch.zeros(k, dtype=torch.float64))
        assert captured_variance(torch.cov(x.T), found.vectors) >= 1 - 1e-9


def test_the_final_solve_stacks_at_most_its_byte_budget_and_gives_the_same_components(
    monkeypatch,
):
    """With FINAL_STACK_BYTES room for one 300-wide covariance, the three groups iterate one at
    a time (three stacks, each of one group) and their components equal those of one stack."""
    from eva_lora import convergence

    k = 8
    solvers, stats, _ = _checked_groups([300, 300, 300], k, checked=[3000, 500, 1500])
    together = convergence.final_eigenpairs(copy.deepcopy(solvers), stats)
    sizes = []
    stack = torch.stack

    def recorded(tensors, *args, **kwargs):
        out = stack(tensors, *args, **kwargs)
        if out.ndim == 3 and out.shape[1:] == (300, 300):
            sizes.append(out.shape[0])
        return out

    monkeypatch.setattr(convergence, "FINAL_STACK_BYTES", 300 * 300 * 4)
    monkeypatch.setattr(convergence.torch, "stack", recorded)
    alone = convergence.final_eigenpairs(copy.deepcopy(solvers), stats)
    assert sizes == [1, 1, 1]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=0)
        assert component_cosine(a.vectors, b.vectors).min() >= 1 - 1e-5


def test_half_reference_share_is_one_at_half_and_a_third_at_a_quarter():
    from eva_lora.convergence import half_reference_share

    assert half_reference_share(50, 100) == 1.0
    assert half_reference_share(25, 100) == pytest.approx(1 / 3)
    assert half_reference_share(30, 100) == pytest.approx(30 / 70)


def test_half_reference_scales_each_check_loss_by_its_snapshot_share(monkeypatch):
    """The same stream, read both ways: every loss with a reference differs by seen / (n - seen)."""
    from eva_lora import convergence

    x = planted(1500, 40, 4, seed=3)
    runs = {}
    for flag in (False, True):
        monkeypatch.setattr(convergence, "HALF_REFERENCE", flag)
        acc, tracker = ExactStatistic(40), ComponentTracker(4, make_solver("exact", 4, 40, 0))
        losses = []
        for batch in x.split(100):
            acc.update(batch.float())
            seen = tracker.reference_tokens(acc.count)
            tracker.check(acc, tau=0.99)
            losses.append((seen, acc.count, list(tracker.loss)))
        runs[flag] = losses
    scaled = 0
    for (seen, n, plain), (_, _, half) in zip(runs[False], runs[True]):
        if seen is None:
            assert half == plain  # no reference yet: the sentinel loss, unscaled
            continue
        scaled += seen * 2 < n  # a snapshot older than half the tokens: the factor is below 1
        assert half == pytest.approx([v * seen / (n - seen) for v in plain], rel=1e-9, abs=1e-15)
    assert scaled >= 3
