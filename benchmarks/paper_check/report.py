"""Assemble REPORT.md from the sections the claim scripts wrote into results/.

    python benchmarks/paper_check/stability.py && python benchmarks/paper_check/report.py
"""

from __future__ import annotations

from pathlib import Path

from eva_lora._atomic import atomic_write_text

HERE = Path(__file__).parent
CLAIMS = [  # (section file, paper claim); a missing file is listed as not yet reproduced
    ("table4.md", "Table 4: LoRA, EVA (rho 1, 2), PiSSA, OLoRA, DoRA, EVA+DoRA on GLUE"),
    ("early_training.md", "Figure 2: loss and gradient norm over the first steps"),
    ("stability.md", "Figures 3 / 8: components across batch orders and batch sizes"),
    ("rank_distribution.md", "Figure 9: rank distribution for rho in {1, 1.5, 2, 3}"),
    ("ablations.md", "Table 7: EVA vs EVA-whiten, EVA-perm, EVA-rot, LoRA-redist"),
]

INTRO = """# The paper's claims at small scale (all-MiniLM-L6-v2, real data)

Every section below is written by a script in this folder; `report.py` assembles them.
Machine: 2 CPU cores, torch 2.13.0 CPU; no GPU was lent for these runs.

| claim | status |
|---|---|
"""


def main() -> None:
    rows, sections = [], []
    for file, claim in CLAIMS:
        path = HERE / "results" / file
        if path.is_file():
            rows.append(f"| {claim} | measured below (`results/{file}`) |")
            sections.append(path.read_text(encoding="utf-8"))
        else:
            rows.append(f"| {claim} | not run yet |")
    atomic_write_text(HERE / "REPORT.md", INTRO + "\n".join(rows) + "\n\n" + "\n".join(sections))
    print(HERE / "REPORT.md")


if __name__ == "__main__":
    main()
