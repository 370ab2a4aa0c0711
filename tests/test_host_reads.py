"""What the EVA loop asks of the device, counted on CPU with a TorchFunctionMode.

On a GPU every value read back to the host (``item``, ``bool``, ``float``, ``int``, ``tolist``,
``cpu``, ``nonzero``, ...) stalls the stream until the queued work is done, and every small
decomposition is a launch plus (for ``eigh``) an error check read back. The budget
(docs/performance.md): per batch, host reads do not grow with the number of groups or of tokens;
decompositions do not grow with tokens, and there are none between convergence checks. Counted
here as the difference between a run of N and of 2N batches, so the probe and the final solve
(once per run) cancel out.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import eva_lora
from eva_lora import EvaConfig, compute_eva_state, engine
from helpers import tiny_llama, token_batches

HOST_READS = {
    "item",
    "tolist",
    "cpu",
    "nonzero",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "unique",
    "masked_select",
    "any",
    "all",
} - {"any", "all"}
DECOMPOSITIONS = {
    "linalg_eigh",
    "linalg_eigvalsh",
    "linalg_qr",
    "linalg_cholesky",
    "linalg_cholesky_ex",
    "linalg_svd",
    "svd",
    "linalg_svdvals",
    "linalg_eig",
    "qr",
    "linalg_lstsq",
    "linalg_inv",
    "linalg_solve",
    "lu",
    "linalg_lu",
    "linalg_lu_factor",
}


EVA_SOURCE = str(Path(eva_lora.__file__).parent)
TORCH_SOURCE = str(Path(torch.__file__).parent)


def caller_is_eva() -> bool:
    """Whether the nearest caller outside torch is eva-lora's code (not the model's own forward:
    transformers reads a few values per pass, e.g. to build its attention mask, as any run does)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_SOURCE):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(EVA_SOURCE)


class Counting(TorchFunctionMode):
    """Counts eva-lora's torch calls reading device values to the host, and its decompositions."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.decompositions: Counter[str] = Counter()
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.paused and (name in HOST_READS or name in DECOMPOSITIONS) and caller_is_eva():
            (self.reads if name in HOST_READS else self.decompositions)[name] += 1
        return func(*args, **(kwargs or {}))


def counted(model, batches, **settings) -> Counting:
    """Counts of the loop (probe, batches, checks); the final solve, once a run, is not counted."""
    cfg = EvaConfig(rank=4, rho=2.0, tau=0.9999999, max_batches=len(batches), **settings)
    counts = Counting()
    build_state = engine._EvaLoop.build_state

    def uncounted(loop, *args, **kwargs):
        counts.paused = True
        return build_state(loop, *args, **kwargs)

    with warnings.catch_warnings(), counts, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr(engine._EvaLoop, "build_state", uncounted)
        state = compute_eva_state(model, batches, cfg, progress=False)
    assert state.n_batches == len(batches) and state.stop_reason == "max_batches"
    return counts


def per_batch(
    layers: int, seq: int, n: int = 3, device: str = "cpu", **settings
) -> tuple[float, float]:
    """(host reads, decompositions) per batch: the difference between 2n and n batches, over n."""
    model = tiny_llama(layers=layers, positions=256).to(device)
    batches = token_batches(101, 2 * n, batch=8, seq=seq)
    short, long = counted(model, batches[:n], **settings), counted(model, batches, **settings)
    reads = sum(long.reads.values()) - sum(short.reads.values())
    decompositions = sum(long.decompositions.values()) - sum(short.decompositions.values())
    return reads / n, decompositions / n


# exact_max_dim=40: the 48-wide down_proj group is a sketch, the 32-wide groups are exact
BOTH_KINDS = dict(exact_max_dim=40, sketch_size=16)


def test_between_checks_a_batch_reads_once_and_decomposes_nothing_whatever_the_layers_and_tokens():
    """check_every beyond the run: only forward passes.

    One read per batch (the token mask's nonzero)."""
    base = per_batch(layers=2, seq=16, check_every=1000, **BOTH_KINDS)
    more_tokens = per_batch(layers=2, seq=64, check_every=1000, **BOTH_KINDS)
    more_layers = per_batch(layers=4, seq=16, check_every=1000, **BOTH_KINDS)
    assert base == more_tokens == more_layers == (1.0, 0.0)


def test_a_check_reads_every_group_in_one_transfer_and_solves_once_per_shape():
    """check_every=1: each batch is also a check. 5 reads (the mask's nonzero; every group's
    numbers, one stack to the host; the allocation's NaN test and its counts) and 4 decompositions
    (exact groups: one batched eigh and one batched QR; sketches: two batched eighs), with 2x the
    layers or 4x the tokens. (No group converges at this tau, so every sketch explores and folds
    at every check; a converged group's longer window is not solved until it folds.)"""
    base = per_batch(layers=2, seq=16, check_every=1, **BOTH_KINDS)
    more_tokens = per_batch(layers=2, seq=64, check_every=1, **BOTH_KINDS)
    more_layers = per_batch(layers=4, seq=16, check_every=1, **BOTH_KINDS)
    assert base == more_tokens == more_layers == (5.0, 4.0)


@pytest.mark.parametrize(("statistics", "solves"), [("exact", 3.0), ("sketch", 2.0)])
def test_each_statistic_alone_keeps_the_same_budget(statistics, solves):
    """exact: one eigh for both widths (their 16-wide Ritz problems), one QR per width (32, 48);
    sketch: a window folded at every check, two eighs."""
    settings = dict(statistics=statistics, sketch_size=16, check_every=1)
    base, more = per_batch(layers=2, seq=16, **settings), per_batch(layers=4, seq=64, **settings)
    assert base == more == (5.0, solves)


def final_solve_counts(groups: int) -> Counting:
    """Counts of the final solve alone (``final_eigenpairs``) of ``groups`` exact groups of one
    width, each fed the same rows (so every group needs the same iterations) after one check."""
    from eva_lora.convergence import ComponentTracker, final_eigenpairs, make_solver
    from eva_lora.statistics import ExactStatistic

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(600, 80, generator=g) * torch.linspace(3.0, 0.1, 80)
    solvers, stats = [], []
    for _ in range(groups):
        stat, tracker = ExactStatistic(80), ComponentTracker(8, make_solver("exact", 8, 80, 0))
        stat.update(rows[:200])
        tracker.check(stat, tau=0.99)
        stat.update(rows[200:])
        solvers.append(tracker.solver)
        stats.append(stat)
    counts = Counting()
    with counts:
        pairs = final_eigenpairs(solvers, stats)
    assert len(pairs) == groups
    return counts


def test_the_final_solve_reads_once_per_iteration_whatever_the_number_of_groups():
    """The exact groups of one width iterate together: 2 or 6 groups, the same host reads and
    the same decompositions (one batched eigh and QR per iteration)."""
    two, six = final_solve_counts(2), final_solve_counts(6)
    assert sum(two.reads.values()) == sum(six.reads.values()) >= 1
    assert two.decompositions == six.decompositions
    assert two.decompositions["linalg_eigh"] == sum(two.reads.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_counts_are_the_same():
    """Batches arrive on the host (as from a DataLoader); model and statistics are on the GPU."""
    for check_every, expected in ((1000, (1.0, 0.0)), (1, (5.0, 4.0))):
        assert (
            per_batch(layers=2, seq=16, device="cuda", check_every=check_every, **BOTH_KINDS)
            == expected
        )
