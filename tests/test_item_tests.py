"""Item-level tests of benchmarks/paper_check/item_tests.py: exact numbers from hand counts."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "paper_check"))

from item_tests import (  # noqa: E402
    accuracy,
    holm,
    item_sign_test,
    matthews,
    mcnemar,
    nested_bootstrap,
    paired_bootstrap,
    pearson,
    sign_test,
    verdict,
)


def test_sign_test_is_the_exact_two_sided_binomial_tail():
    # 9 wins, 1 loss: P(X <= 1) = 11/1024, doubled
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == pytest.approx(22 / 1024)
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    # five wins and nothing else: 2 * 0.5^5
    assert sign_test(5, 0) == pytest.approx(0.0625)


def test_mcnemar_pools_the_discordant_items_of_every_seed():
    a = [[1, 1, 0, 1], [1, 0, 1, 1]]
    b = [[1, 0, 0, 0], [0, 0, 1, 1]]
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (3, 0)
    assert p == pytest.approx(2 * 0.5**3)
    with pytest.raises(ValueError, match="same seeds"):
        mcnemar(a, b[:1])


def test_the_same_five_images_in_three_seeds_are_fifteen_trials_not_three_effects():
    """The vision claim of the issue: 5, 5 and 9 images of 797 ahead in three seeds, none behind,
    is significant as items (19 discordant, all one way), whatever the seeds' spread."""
    n = 797
    a, b = [], []
    for ahead in (5, 5, 9):
        x = np.ones(n, dtype=bool)
        y = x.copy()
        y[:ahead] = False
        a.append(x)
        b.append(y)
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (19, 0)
    assert p == pytest.approx(2 * 0.5**19)


def test_the_item_sign_test_counts_an_item_once_whatever_its_seeds():
    # item 0: a right in both seeds, b in neither (net +2, one item); item 1: split (net 0);
    # item 2: b right once more than a (net -1)
    a = [[1, 1, 0], [1, 0, 0]]
    b = [[0, 0, 1], [0, 1, 0]]
    assert mcnemar(a, b)[:2] == (3, 2)  # pooled: five discordant trials
    assert item_sign_test(a, b) == (1, 1, 1.0)
    # the same 5 images ahead in each of 3 seeds: 15 pooled trials, but 5 items
    x = np.ones((3, 100), dtype=bool)
    y = x.copy()
    y[:, :5] = False
    assert mcnemar(x, y)[:2] == (15, 0) and item_sign_test(x, y) == (5, 0, pytest.approx(0.0625))


def test_holm_multiplies_the_kth_smallest_by_m_minus_k_plus_one_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.02, 0.03]) == pytest.approx([0.04, 0.04])  # 0.03 alone would be 0.03
    assert holm([0.6, 0.6, 0.6]) == pytest.approx([1.0, 1.0, 1.0])


def test_verdict_follows_the_adjusted_p_and_the_sign_of_the_effect():
    assert verdict(0.02, 0.01) == "held"
    assert verdict(-0.02, 0.01) == "contradicted"
    assert verdict(0.02, 0.06) == "not shown"


def test_metrics_match_their_definitions():
    p = np.array([1, 1, 0, 0, 1])
    r = np.array([1, 0, 0, 1, 1])
    assert accuracy(p, r) == pytest.approx(0.6)
    # tp 2, tn 1, fp 1, fn 1
    assert matthews(p, r) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, np.ones(4)) == 0.0


def test_paired_bootstrap_finds_a_clear_gap_and_not_a_null_one():
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 2, 400)
    better = [[np.where(rng.random(400) < 0.9, reference, 1 - reference)] for _ in range(3)]
    worse = [[np.where(rng.random(400) < 0.7, reference, 1 - reference)] for _ in range(3)]
    effect, p = paired_bootstrap(accuracy, better, worse, [reference], replicates=500)
    assert effect == pytest.approx(
        np.mean(
            [accuracy(b[0], reference) - accuracy(w[0], reference) for b, w in zip(better, worse)]
        )
    )
    assert effect > 0.1 and p < 0.01
    # identical predictions: no difference in any replicate, p = 1
    effect, p = paired_bootstrap(accuracy, better, better, [reference], replicates=200)
    assert effect == 0.0 and p == 1.0
    # two methods of equal accuracy: no verdict
    same = [[np.where(rng.random(400) < 0.9, reference, 1 - reference)] for _ in range(3)]
    _, p = paired_bootstrap(accuracy, better, same, [reference], replicates=500)
    assert p > 0.05


def test_paired_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=60)
    a = [[reference + rng.normal(scale=0.5, size=60)] for _ in range(2)]
    b = [[reference + rng.normal(scale=0.7, size=60)] for _ in range(2)]
    first = paired_bootstrap(pearson, a, b, [reference], replicates=300, seed=4)
    assert first == paired_bootstrap(pearson, a, b, [reference], replicates=300, seed=4)


def _episodes(rate_by_task: list[float], seeds: int, items: int, seed: int) -> np.ndarray:
    """0/1 successes, shape (tasks, seeds, items), each task at its own rate."""
    rng = np.random.default_rng(seed)
    rates = np.asarray(rate_by_task)[:, None, None]
    return (rng.random((len(rate_by_task), seeds, items)) < rates).astype(float)


def test_nested_bootstrap_lets_no_single_task_decide():
    # one task of ten: 90 % vs 10 % over 60 episodes each (48 net episodes); the nine others equal
    base = _episodes([0.5] * 10, 3, 20, seed=0)
    eva, lora = base.copy(), base.copy()
    eva[0], lora[0] = _episodes([0.9], 3, 20, seed=1)[0], _episodes([0.1], 3, 20, seed=2)[0]
    _, _, pooled_p = mcnemar(eva.reshape(1, -1) > 0, lora.reshape(1, -1) > 0)
    assert pooled_p < 1e-6  # pooling the episodes calls it held ...
    effect, p = nested_bootstrap(eva, lora, replicates=1000)
    assert effect == pytest.approx((eva - lora).mean())
    assert effect > 0.04
    assert p > 0.3  # ... resampling the tasks does not: ~35 % of replicates miss task 0


def test_nested_bootstrap_holds_a_gap_shared_by_every_task():
    eva = _episodes([0.7] * 10, 3, 20, seed=3)
    lora = _episodes([0.4] * 10, 3, 20, seed=4)
    effect, p = nested_bootstrap(eva, lora, replicates=1000)
    assert effect == pytest.approx((eva - lora).mean())
    assert p < 0.01
    _, p_null = nested_bootstrap(eva, eva.copy(), replicates=200)
    assert p_null == 1.0


def test_nested_bootstrap_refuses_unequal_or_flat_shapes():
    with pytest.raises(ValueError, match="tasks, seeds, items"):
        nested_bootstrap(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="tasks, seeds, items"):
        nested_bootstrap(np.zeros((2, 3)), np.zeros((2, 3)))
