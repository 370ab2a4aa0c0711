"""`eva demo --quick` (the CI form of the demo): EVA vs random LoRA on a real model."""

import json

import pytest

from eva_lora.app.cli import main


def check_table(out: str, rows: list[dict], steps: int) -> None:
    header, rule = out.splitlines()[:2]
    assert header.startswith("| init | init s | train s | loss@") and header.endswith(
        "| mean train loss | accuracy |"
    )
    assert rule == "|" + "---|" * (header.count("|") - 1)  # one separator per column
    assert [r["init"] for r in rows] == ["eva", "lora"]
    assert rows[0]["steps"] == rows[1]["steps"] == steps
    # EVA's init does work; LoRA's is random
    assert rows[0]["init_seconds"] > rows[1]["init_seconds"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["final_train_loss"] > 0


@pytest.mark.slow
def test_quick_smollm2_demo_prints_progress_rank_spread_and_the_table(tmp_path, capsys):
    pytest.importorskip("gguf")
    from eva_lora.app.models import smollm2_gguf

    try:
        smollm2_gguf()
    except ValueError as err:
        pytest.skip(str(err))
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads((tmp_path / "demo.json").read_text())
    check_table(out, rows, 5)
    assert rows[0]["eval_examples"] == 4
    assert "EVA init:" in out and "ranks min" in out and "mean rank by type" in out
    # progress lines while training
    assert "[eva] step 2/5: loss" in err and "[lora] step 5/5: loss" in err
    assert "FutureWarning" not in err
    state = json.loads((tmp_path / "eva/eva_state/eva_state.json").read_text())
    assert "lm_head" in state["ranks"]  # the paper's LM recipe adapts the head too
    for name in (
        "ranks.png",
        "convergence.png",
        "diagnostics.png",
        "loss.png",
        "eva/adapter/README.md",
        "lora/adapter/adapter_config.json",
    ):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_quick_minilm_demo_still_available_by_flag(tmp_path, capsys, minilm):
    assert main(["demo", "--model", "minilm", "--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "demo.json").read_text())
    check_table(out, rows, 16)
    assert rows[0]["eval_examples"] == 128
