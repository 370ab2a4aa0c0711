"""Both statistic kinds against a float64 reference (eigh of the exact covariance of the same rows)."""

import pytest
import torch

from eva_lora import EvaConfig
from eva_lora.distributed import assign_owners
from eva_lora.pca import captured_variance, component_cosine, exact_eigenpairs
from eva_lora.planning import plan_statistics
from eva_lora.statistics import ExactStatistic, SketchStatistic, exact_bytes, sketch_bytes


def planted(n: int, d: int, k: int, seed: int, mean: float = 0.0, tail: float = 1.0) -> torch.Tensor:
    """Rows with k strong directions (std 10 ... 3.2) over noise of std ``tail``."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.full((d,), tail, dtype=torch.float64)
    scales[:k] = torch.linspace(10.0, 3.2, k, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T + mean


def sketch_of(x: torch.Tensor, size: int, batch: int = 100, dtype=torch.float64) -> SketchStatistic:
    sketch = SketchStatistic(x.shape[1], size, dtype=dtype)
    for part in x.split(batch):
        sketch.update(part)
    return sketch


def test_sketch_is_exact_while_the_rows_fit():
    # 60 rows in a sketch of 64 directions: nothing is truncated, so it is the exact PCA.
    x = planted(60, 90, 4, seed=0, mean=2.0)
    sketch, cov = sketch_of(x, 64, batch=25), torch.cov(x.T)
    exact = exact_eigenpairs(cov, 8)
    top = sketch.top(8)
    assert sketch.discarded == pytest.approx(0.0, abs=1e-9)
    assert component_cosine(exact.vectors, top.vectors).min() > 1 - 1e-9
    torch.testing.assert_close(top.values, exact.values, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sketch_captures_the_planted_subspace(seed):
    d, k = 300, 12
    x = planted(3000, d, k, seed=seed)
    sketch = sketch_of(x, 4 * k, batch=256, dtype=torch.float32)
    cov = torch.cov(x.T)
    top = sketch.top(k)
    assert captured_variance(cov, top.vectors) >= 0.999
    torch.testing.assert_close(top.values, exact_eigenpairs(cov, k).values, rtol=2e-2, atol=0)


def test_total_variance_mean_and_count_are_exact_whatever_is_truncated():
    x = planted(1000, 200, 5, seed=3, mean=-4.0)
    sketch = sketch_of(x, 16, batch=128)
    cov = torch.cov(x.T)
    assert sketch.count == 1000
    assert sketch.total_variance() == pytest.approx(float(cov.trace()), rel=1e-10)
    torch.testing.assert_close(sketch.mean, x.mean(0), rtol=0, atol=1e-10)
    # what the sketch keeps plus what it dropped is all the centred energy
    assert float(sketch.power.sum()) + sketch.discarded == pytest.approx(sketch.sq_dist, rel=1e-9)


def test_large_mean_in_float32_keeps_the_components():
    x = planted(2000, 40, 3, seed=4, mean=1e4)
    sketch = sketch_of(x, 12, batch=250, dtype=torch.float32)
    cov = torch.cov(x.T)
    assert captured_variance(cov, sketch.top(3).vectors) >= 0.999
    assert sketch.total_variance() == pytest.approx(float(cov.trace()), rel=1e-4)


def test_batch_boundaries_do_not_matter_within_chunks():
    """Rows are cut into chunks of ``chunk`` rows whatever the batches: same chunks, same bits."""
    x = planted(700, 64, 4, seed=5).float()
    one = SketchStatistic(64, 16, chunk=50)
    one.update(x[:500])
    one.update(x[500:])
    many = SketchStatistic(64, 16, chunk=50)
    for part in x[:500].split(100):  # multiples of the chunk size
        many.update(part)
    many.update(x[500:])
    assert torch.equal(one.basis, many.basis) and torch.equal(one.power, many.power)


def test_state_dict_round_trip_then_continuing_is_bit_identical():
    x = planted(900, 80, 4, seed=6).float()
    straight = SketchStatistic(80, 16)
    for part in x.split(150):
        straight.update(part)
    resumed = SketchStatistic(80, 16)
    for part in x[:450].split(150):
        resumed.update(part)
    resumed = SketchStatistic.from_state_dict(resumed.state_dict())
    for part in x[450:].split(150):
        resumed.update(part)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_merge_of_two_halves_matches_the_whole():
    x = planted(2000, 150, 6, seed=7, mean=3.0)
    left, right = sketch_of(x[:1100], 24), sketch_of(x[1100:], 24)
    left.merge(right)
    cov = torch.cov(x.T)
    assert left.count == 2000
    assert left.total_variance() == pytest.approx(float(cov.trace()), rel=1e-10)
    torch.testing.assert_close(left.mean, x.mean(0), rtol=0, atol=1e-10)
    assert captured_variance(cov, left.top(6).vectors) >= 0.999


def test_rank_deficient_rows_still_give_k_orthonormal_components():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    top = sketch_of(x, 16).top(8)
    gram = top.vectors @ top.vectors.T
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-9)
    assert bool((top.values[3:] == 0).all()) and bool((top.values[:3] > 0).all())


def test_exact_statistic_matches_torch_cov():
    x = planted(500, 70, 3, seed=9, mean=5.0)
    stat = ExactStatistic(70, dtype=torch.float64)
    for part in x.split(64):
        stat.update(part)
    torch.testing.assert_close(stat.covariance(), torch.cov(x.T), rtol=0, atol=1e-10)
    assert stat.nbytes == exact_bytes(70, 8)


def test_update_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"expected rows of shape \(n, 8\)"):
        SketchStatistic(8, 4).update(torch.zeros(3, 9))


def test_bytes_bound_the_sketch_far_below_the_exact_statistic_at_8b_widths():
    # Llama-3-8B down_proj: 14336 wide; r 16, rho 2 -> 32 components, a sketch of 128.
    assert exact_bytes(14336) == pytest.approx(822e6, rel=0.01)
    assert sketch_bytes(14336, 128) < exact_bytes(14336) / 25


def test_auto_plan_keeps_exact_statistics_only_for_narrow_groups():
    cfg = EvaConfig(rank=4, rho=2.0)  # 8 components, sketch of 32
    plans = plan_statistics([384, 1024, 1536, 4096], cfg)
    assert [p.kind for p in plans] == ["exact", "exact", "sketch", "sketch"]
    assert [p.size for p in plans] == [None, None, 32, 32]


def test_budget_turns_the_largest_exact_groups_into_sketches_first():
    cfg = EvaConfig(rank=4, rho=2.0, statistics_budget_mb=(exact_bytes(512) + exact_bytes(256)) / 2**20 + 0.5)
    plans = plan_statistics([512, 1024, 256], cfg)
    assert [p.kind for p in plans] == ["exact", "sketch", "exact"]
    assert sum(p.nbytes for p in plans) <= cfg.statistics_budget_mb * 2**20


def test_budget_too_small_for_sketches_names_the_rank_and_the_need():
    cfg = EvaConfig(rank=4, rho=2.0, statistics="sketch", statistics_budget_mb=0.01)
    with pytest.raises(ValueError, match=r"statistics_budget_mb=0.01 is too small: rank 0 needs [0-9.]+ MB"):
        plan_statistics([4096, 4096], cfg, names=["a", "b"])


def test_owners_balance_bytes_across_ranks_deterministically():
    sizes = [900, 100, 500, 500, 400, 100]
    owners = assign_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert owners == assign_owners(sizes, 2)
    assert max(loads) - min(loads) <= 100 and sorted(set(owners)) == [0, 1]
    assert assign_owners(sizes, 1) == [0] * 6


def test_sketch_size_below_the_needed_components_is_refused():
    with pytest.raises(ValueError, match=r"sketch_size must be an integer >= the 32 components"):
        EvaConfig(rank=16, rho=2.0, sketch_size=16)
