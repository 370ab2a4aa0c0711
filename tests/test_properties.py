"""Property tests (hypothesis) for the numerical core, rank allocation and the state loader."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eva_lora import EvaConfig, EvaState, StateFileError, compute_eva_state
from eva_lora.allocation import allocate_ranks
from eva_lora.pca import CovarianceAccumulator, component_cosine, exact_eigenpairs

FAST = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def allocation_problems(draw):
    n_layers = draw(st.integers(1, 8))
    rank = draw(st.integers(1, 6))
    rho = draw(st.sampled_from([1.0, 1.5, 2.0, 3.0]))
    cap = max(1, round(rank * rho))
    scores = {}
    for i in range(n_layers):
        k = draw(st.integers(1, cap))
        values = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=k, max_size=k))
        scores[f"layer{i}"] = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    min_rank = draw(st.integers(0, min(rank, 1)))
    return scores, rank, rho, min_rank


@FAST
@given(allocation_problems())
def test_ranks_sum_to_the_budget_and_respect_caps(problem):
    scores, rank, rho, min_rank = problem
    cap = max(1, round(rank * rho))
    caps = {n: cap for n in scores}
    ranks = allocate_ranks(scores, rank * len(scores), caps, min_rank)
    capacity = sum(min(cap, s.numel()) for s in scores.values())
    assert sum(ranks.values()) == min(rank * len(scores), capacity)
    for name, r in ranks.items():
        assert min(min_rank, scores[name].numel()) <= r <= min(cap, scores[name].numel())


@FAST
@given(allocation_problems())
def test_captured_score_is_monotone_in_rho(problem):
    """Raising rho only loosens the caps, so the variance the allocation captures never drops."""
    scores, rank, _, _ = problem
    budget = rank * len(scores)
    captured = []
    for rho in (1.0, 1.5, 2.0, 3.0):
        caps = {n: max(1, round(rank * rho)) for n in scores}
        ranks = allocate_ranks(scores, budget, caps)
        captured.append(sum(float(scores[n][:r].sum()) for n, r in ranks.items()))
    assert all(b >= a - 1e-12 for a, b in zip(captured, captured[1:]))


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(2, 6))
def test_batch_order_does_not_change_planted_components(seed, n_batches):
    """The statistic is exact, so any batch order gives the same covariance; on a planted spectrum
    (gap 10x) the top components agree to |cos| > 1 - 1e-9."""
    g = torch.Generator().manual_seed(seed)
    dim, k = 12, 3
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.tensor([10.0, 8.0, 6.0] + [0.5] * (dim - k), dtype=torch.float64)
    batches = [
        (torch.randn(40, dim, generator=g, dtype=torch.float64) * scales) @ basis.T + 3.0
        for _ in range(n_batches)
    ]
    order = torch.randperm(n_batches, generator=g).tolist()
    results = []
    for sequence in (range(n_batches), order):
        acc = CovarianceAccumulator(dim, dtype=torch.float64)
        for i in sequence:
            acc.update(batches[i])
        results.append(acc)
    torch.testing.assert_close(
        results[0].covariance(), results[1].covariance(), rtol=1e-10, atol=1e-10
    )
    first, second = (exact_eigenpairs(r.covariance(), k).vectors for r in results)
    assert bool((component_cosine(first, second) > 1 - 1e-9).all())


def _small_state(tmp_path) -> EvaState:
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import token_batches

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=50,
            max_position_embeddings=32,
        )
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = compute_eva_state(model, token_batches(50, 3), EvaConfig(rank=2, max_batches=3))
    state.save(tmp_path / "state")
    return state


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    file=st.sampled_from(["eva_state.safetensors", "eva_state.json"]),
    position=st.floats(0, 1),
    value=st.integers(0, 255),
    truncate=st.booleans(),
)
def test_loader_fuzz_never_crashes_or_accepts_a_broken_state(
    tmp_path, file, position, value, truncate
):
    """A mutated or truncated file is refused with StateFileError, or (a JSON whitespace change)
    loads into exactly the original state: nothing is ever accepted changed."""
    directory = tmp_path / "state"
    if not directory.is_dir():
        _small_state(tmp_path)
    reference = EvaState.load(directory)
    path = directory / file
    original = path.read_bytes()
    index = min(int(position * len(original)), len(original) - 1)
    mutated = (
        original[:index] if truncate else original[:index] + bytes([value]) + original[index + 1 :]
    )
    path.write_bytes(mutated)
    try:
        loaded = EvaState.load(directory)
        if file == "eva_state.safetensors":
            assert mutated == original  # a changed tensor file never passes the checksum
        assert loaded.ranks == reference.ranks and loaded.config == reference.config
        assert loaded.groups == reference.groups and loaded.history == reference.history
        for a, b in zip(loaded.group_components, reference.group_components):
            assert torch.equal(a, b)
    except StateFileError:
        pass
    finally:
        path.write_bytes(original)
