"""Tests over test items as well as seeds, and Holm's correction across the comparisons of a table.

A seed-only test (``verdicts.paired``) asks whether the training randomness could explain a gap; it
says nothing about the test set, which every run shares: 5 images of 797 in each of 3 seeds can be
the same 5 easy images. These tests resample or count the *items* too:

- :func:`mcnemar` for scores that count right answers (accuracy, success per episode): the items
  where the two methods disagree, pooled over seeds (the same item in two seeds counts twice: each
  seed is a separate trial of both methods on it), and the exact two-sided sign test on them.
  Pooling treats an item's seeds as independent trials; they are not when some items suit one
  method in every seed, and the test is then too lenient. :func:`item_sign_test` takes the item as
  the unit instead (its net over the seeds), the conservative reading.
- :func:`paired_bootstrap` for any score (Matthews correlation, Pearson, an average over tasks):
  each replicate draws the seeds and, per task, the test items with replacement, the same draws for
  both methods, and recomputes the difference of their seed-averaged scores. The two-sided p-value
  is twice the share of replicates on the far side of zero.
- :func:`nested_bootstrap` for scores of items grouped in tasks (Meta-World episodes): tasks,
  seeds within a task and items within a seed are all resampled, so no single task can carry the
  verdict.
- :func:`holm` adjusts the p-values of all the comparisons a table makes (Holm 1979: the k-th
  smallest of m is multiplied by m - k + 1, then made monotone), so "held" means held with the whole
  table's error rate at ``ALPHA``.

:func:`verdict` turns an adjusted p-value and the sign of the effect into "held" (EVA better),
"contradicted" (EVA worse) or "not shown".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

ALPHA = 0.05
BOOTSTRAP_REPLICATES = 2000


def mcnemar(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> tuple[int, int, float]:
    """(items only ``a`` got right, items only ``b`` got right, two-sided exact p), pooled over the
    seeds: ``a[s][i]`` is whether method a was right on item i in seed s."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("McNemar needs the same seeds and the same items on both sides")
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    only_a = int((x & ~y).sum())
    only_b = int((~x & y).sum())
    return only_a, only_b, sign_test(only_a, only_b)


def item_sign_test(
    a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]
) -> tuple[int, int, float]:
    """(items a wins on net over the seeds, items b wins on net, two-sided exact p): each item
    counts once, however many seeds agree on it."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("the item sign test needs the same seeds and the same items on both sides")
    net = np.asarray(a, dtype=int).sum(0) - np.asarray(b, dtype=int).sum(0)
    wins, losses = int((net > 0).sum()), int((net < 0).sum())
    return wins, losses, sign_test(wins, losses)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial test of wins vs losses at p = 1/2 (1.0 when there are none)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, j) for j in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(
    score: Callable[[np.ndarray, np.ndarray], float]
    | Sequence[Callable[[np.ndarray, np.ndarray], float]],
    a: Sequence[Sequence[np.ndarray]],
    b: Sequence[Sequence[np.ndarray]],
    references: Sequence[np.ndarray],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> tuple[float, float]:
    """(observed difference a - b, two-sided p) of the seed-averaged, task-averaged ``score``.

    ``a[s][t]``: method a's predictions on task t in seed s (an array over that task's items);
    ``references[t]``: task t's gold answers. ``score(predictions, references)`` is the metric
    (one for every task, or a sequence with one per task). Each replicate resamples seeds, and
    items within each task, with replacement."""
    seeds, tasks = len(a), len(references)
    if len(b) != seeds or any(len(row) != tasks for row in (*a, *b)):
        raise ValueError("paired bootstrap needs the same seeds and tasks on both sides")
    scores = list(score) if isinstance(score, Sequence) else [score] * tasks
    if len(scores) != tasks:
        raise ValueError(f"{len(scores)} metrics for {tasks} tasks")

    def difference(seed_rows: np.ndarray, items: list[np.ndarray]) -> float:
        total = 0.0
        for s in seed_rows:
            for t in range(tasks):
                ref = references[t][items[t]]
                total += scores[t](a[s][t][items[t]], ref) - scores[t](b[s][t][items[t]], ref)
        return total / (len(seed_rows) * tasks)

    everything = [np.arange(len(r)) for r in references]
    observed = difference(np.arange(seeds), everything)
    rng = np.random.default_rng(seed)
    below = above = 0
    for _ in range(replicates):
        seed_rows = rng.integers(0, seeds, seeds)
        items = [rng.integers(0, len(r), len(r)) for r in references]
        delta = difference(seed_rows, items)
        below += delta <= 0
        above += delta >= 0
    p = min(1.0, 2.0 * (min(below, above) + 1) / (replicates + 1))
    return observed, p


def nested_bootstrap(
    a: Sequence[Sequence[Sequence[float]]],
    b: Sequence[Sequence[Sequence[float]]],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> tuple[float, float]:
    """(observed mean of a - b, two-sided p) with tasks, seeds and items all resampled.

    ``a[t][s][i]``: method a's score on item i of seed s of task t (success of an episode, 0/1),
    paired with ``b[t][s][i]`` (same task, seed and item: in Meta-World, the same goal). Each
    replicate draws the tasks with replacement, then for each drawn task its seeds, then for each
    drawn seed its items, and averages the paired differences. Resampling the *tasks* is what makes
    one task unable to decide the verdict: a gap that lives in one task of ten vanishes from the
    ~35 % of replicates that miss it, so its p-value stays large however many episodes that task
    has, where a test pooling the episodes would call it held."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 3 or 0 in x.shape:
        raise ValueError(
            "nested bootstrap needs equal (tasks, seeds, items) arrays, got "
            f"{x.shape} and {y.shape}"
        )
    difference = x - y
    tasks, seeds, items = difference.shape
    observed = float(difference.mean())
    rng = np.random.default_rng(seed)
    below = above = 0
    for _ in range(replicates):
        t = rng.integers(0, tasks, tasks)[:, None, None]
        s = rng.integers(0, seeds, (tasks, seeds))[:, :, None]
        i = rng.integers(0, items, (tasks, seeds, items))
        delta = difference[t, s, i].mean()
        below += delta <= 0
        above += delta >= 0
    p = min(1.0, 2.0 * (min(below, above) + 1) / (replicates + 1))
    return observed, p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(effect: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """ "held" / "contradicted" when the adjusted p is below ``alpha`` (by the effect's sign)."""
    if p_adjusted < alpha and effect > 0:
        return "held"
    if p_adjusted < alpha and effect < 0:
        return "contradicted"
    return "not shown"


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


def matthews(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation of two binary label arrays (0 when a side is constant)."""
    p = predictions.astype(bool)
    r = references.astype(bool)
    tp, tn = float(np.sum(p & r)), float(np.sum(~p & ~r))
    fp, fn = float(np.sum(p & ~r)), float(np.sum(~p & r))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    """Pearson correlation (0 when a side is constant)."""
    x = predictions.astype(float) - predictions.mean()
    y = references.astype(float) - references.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return 0.0 if denominator == 0 else float(x @ y) / denominator


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "matthews": matthews,
    "pearson": pearson,
}
