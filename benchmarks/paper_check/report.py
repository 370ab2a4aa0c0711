"""Assemble REPORT.md from the sections the claim scripts wrote into results/.

    python benchmarks/paper_check/stability.py && python benchmarks/paper_check/report.py

The summary table at the top states, per claim, whether it held here and by how much. Each verdict
is computed from the script's JSON by a small rule written next to the claim below, so a rerun
with other numbers updates the verdict too; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eva_lora._atomic import atomic_write_text

HERE = Path(__file__).parent
Verdict = tuple[str, str]  # ("held" | "partly" | "not shown", the numbers behind it)


def table4_verdict(r: dict[str, Any]) -> Verdict:
    """Paper: EVA scores at least as well as LoRA and the weight-driven inits; EVA+DoRA >= DoRA."""
    avg = {m: row["average"]["mean"] for m, row in r["summary"].items()}
    std = {m: row["average"]["std"] for m, row in r["summary"].items()}
    eva = max((m for m in avg if m.startswith("EVA rho")), key=avg.get)
    others = [m for m in ("LoRA", "PiSSA", "OLoRA") if m in avg]
    beaten = [m for m in others if avg[eva] >= avg[m]]
    text = (f"best EVA ({eva}) average {100 * avg[eva]:.2f} +/- {100 * std[eva]:.2f}; "
            + ", ".join(f"{m} {100 * avg[m]:.2f} ({100 * (avg[eva] - avg[m]):+.2f})" for m in others))
    if "DoRA" in avg and "EVA+DoRA rho=2" in avg:
        text += f"; EVA+DoRA vs DoRA {100 * (avg['EVA+DoRA rho=2'] - avg['DoRA']):+.2f}"
    verdict = "held" if len(beaten) == len(others) else "partly" if beaten else "not shown"
    lead = min((avg[eva] - avg[m] for m in others), default=0.0)
    if verdict == "held" and lead < std[eva]:
        text += "; the lead is within the std over seeds"
    return verdict, text


def early_training_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Figure 2): EVA's loss is lower early than LoRA's, PiSSA's and OLoRA's."""
    start = 20 if r["steps"] > 20 else r["steps"] // 2
    loss = {i: statistics.fmean(c["loss"][start:]) for i, c in r["curves"].items()}
    below = [i for i in loss if i != "eva" and loss["eva"] < loss[i]]
    others = len(loss) - 1
    text = (f"mean loss steps {start + 1}-{r['steps']}: "
            + ", ".join(f"{i} {v:.4f}" for i, v in sorted(loss.items(), key=lambda kv: kv[1]))
            + f"; EVA below {len(below)} of {others}; gradient norm steps 1-5 (paper: largest for EVA): "
            + ", ".join(f"{i} {statistics.fmean(c['grad_norm'][:5]):.3f}" for i, c in r["curves"].items()))
    return ("held" if len(below) == others else "partly" if below else "not shown"), text


def stability_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Figures 3/8): components mostly invariant to batch order and size; small batches converge sooner."""
    means = r["orders"]["mean"]
    stable = next((k for k, v in enumerate(means) if v < 0.95), len(means))
    seconds = {int(bs): run["seconds"] for bs, run in r["size_runs"].items()}
    fastest = min(seconds, key=seconds.get)
    text = (f"top {stable} of {len(means)} components keep a mean abs(cos) >= 0.95 across orders "
            f"({', '.join(f'{v:.3f}' for v in means)}); fastest convergence at batch size {fastest} "
            f"({seconds[fastest]} s vs {seconds[max(seconds)]} s at {max(seconds)})")
    verdict = "held" if stable == len(means) else "partly" if stable else "not shown"
    return verdict, text


def rank_distribution_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Figure 9): the ranks change most for rho < 1.5 and hardly above rho = 2."""
    moved = list(r["moved"].values())
    text = "share of the rank budget moved: " + ", ".join(f"rho {k} {v:.3f}" for k, v in r["moved"].items())
    decreasing = all(a > b for a, b in zip(moved, moved[1:]))
    return ("held" if decreasing and moved[-1] < 0.05 else "partly" if moved[0] == max(moved) else "not shown"), text


def ablations_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Table 7): EVA beats whitening, permuted ranks, random rotation and redistributed LoRA."""
    rows = {row["init"]: row for row in r["summary"]}
    eva = rows["eva"]
    leads = {name: eva["mean"] - row["mean"] for name, row in rows.items() if name != "eva"}
    clear = [n for n, lead in leads.items() if lead > max(eva["std"], rows[n]["std"])]
    text = (f"EVA {100 * eva['mean']:.2f} +/- {100 * eva['std']:.2f}; lead over "
            + ", ".join(f"{n} {100 * v:+.2f}" for n, v in leads.items())
            + f"; larger than the std over seeds: {', '.join(clear) or 'none'}")
    ahead = sum(v > 0 for v in leads.values())
    return ("held" if ahead == len(leads) else "partly" if ahead else "not shown"), text


CLAIMS: list[tuple[str, str, Callable[[dict[str, Any]], Verdict]]] = [  # (script stem, paper claim, rule)
    ("table4", "Table 4: LoRA, EVA (rho 1, 2), PiSSA, OLoRA, DoRA, EVA+DoRA on GLUE", table4_verdict),
    ("early_training", "Figure 2: loss and gradient norm over the first steps", early_training_verdict),
    ("stability", "Figures 3 / 8: components across batch orders and batch sizes", stability_verdict),
    ("rank_distribution", "Figure 9: rank distribution for rho in {1, 1.5, 2, 3}", rank_distribution_verdict),
    ("ablations", "Table 7: EVA vs EVA-whiten, EVA-perm, EVA-rot, LoRA-redist", ablations_verdict),
]

INTRO = """# The paper's claims at small scale (all-MiniLM-L6-v2, real data)

Every section below is written by a script in this folder; `report.py` assembles them and computes
the verdicts from the scripts' JSON (rules in `report.py`). Machine: 2 CPU cores, torch 2.13.0 CPU;
no GPU was lent for these runs. A section from a `--quick` run is marked as such and proves nothing.

| claim | here | numbers |
|---|---|---|
"""


def main(results: Path = HERE / "results", report: Path = HERE / "REPORT.md") -> str:
    rows, sections = [], []
    for stem, claim, rule in CLAIMS:
        section, data = results / f"{stem}.md", results / f"{stem}.json"
        if not (section.is_file() and data.is_file()):
            rows.append(f"| {claim} | not run yet | - |")
            continue
        record = json.loads(data.read_text(encoding="utf-8"))
        verdict, numbers = rule(record)
        rows.append(f"| {claim} | {verdict}{' (quick run)' if record.get('quick') else ''} | {numbers} |")
        sections.append(section.read_text(encoding="utf-8"))
    text = INTRO + "\n".join(rows) + "\n\n" + "\n".join(sections)
    atomic_write_text(report, text)
    print(report)
    return text


if __name__ == "__main__":
    main()
