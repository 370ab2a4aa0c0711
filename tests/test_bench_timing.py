"""bench_init.py judges its overhead on the median of paired runs: the arithmetic of that record."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_init import _timing_record  # noqa: E402


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
