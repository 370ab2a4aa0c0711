"""`eva demo --quick` (the CI form of the demo): EVA vs LoRA on the real MiniLM and SST-2."""

import json

import pytest

from eva_lora.cli import main


@pytest.mark.slow
def test_quick_demo_prints_the_table_and_writes_plots_and_adapters(tmp_path, capsys, minilm):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("| init | init s | train s | loss@") and header.endswith("| accuracy |")
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert [r["init"] for r in rows] == ["eva", "lora"]
    assert rows[0]["steps"] == rows[1]["steps"] == 16 and rows[0]["eval_examples"] == 128
    assert rows[0]["init_seconds"] > rows[1]["init_seconds"]  # EVA's init does work; LoRA's is random
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["final_train_loss"] > 0
    for name in ("ranks.png", "convergence.png", "loss.png", "eva/adapter/adapter_config.json",
                 "lora/adapter/adapter_config.json"):
        assert (tmp_path / name).is_file()
