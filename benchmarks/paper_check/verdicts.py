"""How a claim is judged: a paired comparison over seeds, with a stated threshold.

Runs with the same seed share their data order, evaluation rows and (for data-free inits) random
draws, so two methods are compared seed by seed. For differences ``d_s = A_s - B_s`` over ``n``
seeds, the claim "A beats B" is

- **held** when the mean difference exceeds the one-sided 95 % paired-t threshold
  ``t(0.95, n - 1) * sd(d) / sqrt(n)`` (t = 6.31, 2.92, 2.35 for 2, 3, 4 seeds) and is positive;
- **contradicted** when it is that far below zero;
- **not shown** otherwise (the effect, if any, is within the noise of these seeds).

A single seed cannot tell an effect from noise: every comparison is "not shown" then.

When the scores count test items (accuracy on ``items`` questions, success over ``items`` episodes),
the threshold has a floor: the difference must add up to at least ``MIN_NET_ITEMS`` (5) items net
over all seeds together. Scores that count few items are discrete, and seeds can agree by chance:
EVA one GSM8K question ahead of LoRA in each of 2 seeds gives a seed spread of 0, hence a
t-threshold of 0, and would be "held" on 2 questions. An exact sign (McNemar) test on the items
where two methods disagree cannot reach p < 0.05 with fewer than 5 of them (0.5^5 = 0.031), however
the seeds fall.

A task **carries no signal** when every run of every method lies within ``NO_SIGNAL_RANGE`` (2
points) of every other (CoLA at Matthews 0 for all, RTE at chance, GSM8K near 0 for a 135M model):
it is listed, and left out of averages and verdicts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

T_95_ONE_SIDED = {
    1: 6.314,
    2: 2.920,
    3: 2.353,
    4: 2.132,
    5: 2.015,
    6: 1.943,
    7: 1.895,
    8: 1.860,
    9: 1.833,
}
NO_SIGNAL_RANGE = 0.02
MIN_NET_ITEMS = 5


def paired(
    a: Sequence[float], b: Sequence[float], items: int | None = None
) -> tuple[str, float, float]:
    """(verdict, mean difference, threshold) for "a beats b", a and b in seed order; ``items``: how
    many test items each score counts (None for scores that count none, such as losses or
    correlations)."""
    if len(a) != len(b):
        raise ValueError(
            f"paired comparison needs the same seeds on both sides, got {len(a)} and {len(b)}"
        )
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return "not shown", mean, math.inf
    threshold = (
        T_95_ONE_SIDED.get(len(diffs) - 1, 1.645) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    )
    if items is not None:
        # mean > floor <=> the net item difference over all seeds (an
        # integer) is at least MIN_NET_ITEMS
        threshold = max(threshold, (MIN_NET_ITEMS - 0.5) / (len(diffs) * items))
    if mean > 0 and mean > threshold:
        return "held", mean, threshold
    if mean < 0 and -mean > threshold:
        return "contradicted", mean, threshold
    return "not shown", mean, threshold


def paired_by_seed(
    a: dict[int, float], b: dict[int, float], items: int | None = None
) -> tuple[str, float, float, int]:
    """:func:`paired` on the seeds both sides have finished, and how many those are: a grid filled
    in over several sittings holds more seeds for some methods than for others, and only same-seed
    runs pair."""
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} and {sorted(b)}")
    return (*paired([a[s] for s in seeds], [b[s] for s in seeds], items), len(seeds))


def no_signal(scores: Sequence[float]) -> bool:
    """True when a task's runs (all methods and seeds) span less than NO_SIGNAL_RANGE."""
    return max(scores) - min(scores) < NO_SIGNAL_RANGE


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons."""
    if verdicts and all(v == "held" for v in verdicts):
        return "held"
    if any(v == "contradicted" for v in verdicts) and not any(v == "held" for v in verdicts):
        return "contradicted"
    return "partly" if any(v == "held" for v in verdicts) else "not shown"


def describe(
    name: str, verdict: str, mean: float, threshold: float, scale: float = 100.0, digits: int = 2
) -> str:
    """``name +d.dd (threshold t.tt: verdict)``; ``digits`` for small values (loss, grad norm)."""
    bound = "n/a (1 seed)" if math.isinf(threshold) else f"{scale * threshold:.{digits}f}"
    return f"{name} {scale * mean:+.{digits}f} (threshold {bound}: {verdict})"
