"""The paper-check scripts run in their --quick form and produce their tables and figures."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks/paper_check"))


@pytest.mark.slow
def test_stability_quick_writes_table_json_and_figure(tmp_path, minilm):
    import stability

    stability.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "stability.json").read_text())
    assert len(record["orders"]["mean"]) == stability.K_SHOWN and set(record["sizes"]) == {"8"}
    assert record["orders"]["mean"][0] > 0.9  # the top component is stable across batch orders
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in record["orders"]["min"])
    assert "| bs 8 |" in (tmp_path / "stability.md").read_text()
    assert (tmp_path / "stability.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rank_distribution_quick_gives_uniform_ranks_at_rho_1(tmp_path, minilm):
    import rank_distribution

    rank_distribution.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "rank_distribution.json").read_text())
    assert set(record["ranks"]["1.0"].values()) == {8}  # rho = 1 means uniform ranks
    assert sum(record["ranks"]["2.0"].values()) == 8 * len(record["ranks"]["2.0"])  # same budget
    assert 0.0 <= record["moved"]["1.0->2.0"] <= 1.0 and record["max_rank"]["2.0"] <= 16
    assert (tmp_path / "rank_distribution.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_early_training_quick_logs_every_step_for_each_init(tmp_path, minilm):
    import early_training

    early_training.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "early_training.json").read_text())
    assert set(record["curves"]) == {"eva", "lora"}
    for curve in record["curves"].values():
        assert len(curve["loss"]) == len(curve["grad_norm"]) == 8
        assert all(0.0 < v < 5.0 for v in curve["loss"]) and all(v > 0 for v in curve["grad_norm"])
    assert "| eva |" in (tmp_path / "early_training.md").read_text()


@pytest.mark.slow
def test_ablations_quick_compares_eva_with_an_ablation(tmp_path, minilm):
    import ablations

    ablations.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "ablations.json").read_text())
    assert [r["init"] for r in record["summary"]] == ["eva", "eva-perm"]
    for row in record["summary"]:
        assert row["seeds"] == 1 and 0.0 <= row["mean"] <= 1.0 and row["train_loss_mean"] > 0
    assert "| eva-perm |" in (tmp_path / "ablations.md").read_text()
