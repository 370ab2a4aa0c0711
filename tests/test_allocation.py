import pytest
import torch

from eva_lora.allocation import allocate_ranks, rank_scores


def test_uniform_when_cap_equals_rank():
    scores = {f"l{i}": torch.linspace(1.0, 0.1, 8) * (i + 1) for i in range(5)}
    ranks = allocate_ranks(scores, budget=4 * 5, caps={n: 4 for n in scores})
    assert set(ranks.values()) == {4}


def test_budget_goes_to_highest_scores():
    scores = {"a": torch.tensor([0.5, 0.3, 0.1]), "b": torch.tensor([0.4, 0.05, 0.01])}
    assert allocate_ranks(scores, budget=3, caps={"a": 3, "b": 3}) == {"a": 2, "b": 1}
    assert allocate_ranks(scores, budget=4, caps={"a": 2, "b": 3}) == {"a": 2, "b": 2}


def test_min_rank_floor_and_zero_rank():
    scores = {"a": torch.tensor([0.9, 0.8, 0.7]), "b": torch.tensor([0.01, 0.001, 0.0001])}
    assert allocate_ranks(scores, budget=3, caps={"a": 3, "b": 3}) == {"a": 3, "b": 0}
    assert allocate_ranks(scores, budget=3, caps={"a": 3, "b": 3}, min_rank=1) == {"a": 2, "b": 1}


def test_ties_are_deterministic():
    scores = {"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([0.5, 0.5])}
    assert allocate_ranks(scores, budget=3, caps={"a": 2, "b": 2}) == {"a": 2, "b": 1}


def test_capacity_below_budget_spends_what_exists():
    scores = {"a": torch.tensor([0.5]), "b": torch.tensor([0.4, 0.2])}
    assert allocate_ranks(scores, budget=10, caps={"a": 4, "b": 4}) == {"a": 1, "b": 2}


def test_rank_metrics():
    values = torch.tensor([4.0, 2.0, 1.0])
    assert torch.allclose(
        rank_scores(values, 10.0, "ratio"), torch.tensor([0.4, 0.2, 0.1], dtype=torch.float64)
    )
    assert torch.allclose(rank_scores(values, 10.0, "raw"), values.double())
    assert torch.allclose(
        rank_scores(values, 10.0, "max"), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="unknown rank metric"):
        rank_scores(values, 1.0, "bogus")


def test_min_rank_over_budget_is_an_error():
    with pytest.raises(ValueError, match="exceeds the budget"):
        allocate_ranks(
            {"a": torch.ones(3), "b": torch.ones(3)}, budget=1, caps={"a": 3, "b": 3}, min_rank=1
        )
