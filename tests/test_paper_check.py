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
