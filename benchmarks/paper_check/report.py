"""Assemble REPORT.md from the sections the claim scripts wrote into results/.

    python benchmarks/paper_check/stability.py && python benchmarks/paper_check/report.py

The summary table at the top states, per claim, whether it held here and by how much; below it,
the claims that set EVA against other initialisations are grouped by verdict (where EVA's edge
survives, and how each was judged). Each verdict
is computed from the script's JSON by a rule written next to the claim below (paired comparisons
over seeds with a stated threshold, tasks without signal left out: see verdicts.py), so a rerun with
other numbers updates the verdict too; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import plans
from item_tests import ALPHA, METRICS, holm, paired_bootstrap
from item_tests import verdict as item_verdict
from verdicts import NO_SIGNAL_RANGE, combine, describe, no_signal, paired, paired_by_seed

from eva_lora.files import atomic_write_text

HERE = Path(__file__).parent
# ("held" | "partly" | "not shown" | "contradicted", the numbers behind it)
Verdict = tuple[str, str]


def _seed_scores(runs: dict[str, list[dict[str, Any]]]) -> dict[int, float]:
    return {run["seed"]: run["score"] for run in runs}


def table_verdict(
    r: dict[str, Any], eva_rows: list[str], baselines: list[str], pairs: list[tuple[str, str]] = ()
) -> Verdict:
    """Paper: EVA scores at least as well as LoRA and the weight-driven inits (EVA+DoRA >= DoRA).

    Per seed, each method's average over the tasks that carry signal; then paired comparisons."""
    tasks = list(r["runs"])
    quiet = [
        t
        for t in tasks
        if no_signal([run["score"] for runs in r["runs"][t].values() for run in runs])
    ]
    used = [t for t in tasks if t not in quiet]
    if not used:
        return (
            "not shown",
            f"no task carries signal (every run within {100 * NO_SIGNAL_RANGE:.0f} points): "
            f"{quiet}",
        )
    seeds = sorted(_seed_scores(next(iter(r["runs"][used[0]].values()))))
    average = {
        m: [statistics.fmean(_seed_scores(r["runs"][t][m])[s] for t in used) for s in seeds]
        for m in r["runs"][used[0]]
    }
    eva = max((m for m in eva_rows if m in average), key=lambda m: statistics.fmean(average[m]))
    comparisons = [(eva, b) for b in baselines if b in average] + [
        p for p in pairs if set(p) <= set(average)
    ]
    results = [(f"{a} vs {b}", *paired(average[a], average[b])) for a, b in comparisons]
    text = (
        f"tasks with signal: {', '.join(used)}"
        + (f" (no signal, left out: {', '.join(quiet)})" if quiet else "")
        + f"; average over them, {len(seeds)} seeds, paired: "
        + "; ".join(describe(name, v, mean, thr) for name, v, mean, thr in results)
    )
    return combine([v for _, v, _, _ in results]), text


def table4_verdict(r: dict[str, Any]) -> Verdict:
    if "items" in r:
        return item_table_verdict(r, TABLE4_COMPARISONS)
    return table_verdict(
        r, ["EVA rho=1", "EVA rho=2"], ["LoRA", "PiSSA", "OLoRA"], [("EVA+DoRA rho=2", "DoRA")]
    )


# every EVA variant against every baseline: no variant is chosen after the results (plans/table4)
TABLE4_COMPARISONS = [
    (eva, base) for eva in ("EVA rho=1", "EVA rho=2") for base in ("LoRA", "PiSSA", "OLoRA")
] + [("EVA+DoRA rho=2", "DoRA")]


def item_table_verdict(r: dict[str, Any], comparisons: list[tuple[str, str]]) -> Verdict:
    """Each comparison "A at least as good as B" of a table, tested over seeds and evaluation items
    together (a paired bootstrap of the per-seed average over the tasks with signal, each task with
    its own metric), Holm-corrected across the table's comparisons."""
    tasks, items = list(r["runs"]), r["items"]
    quiet = [
        t
        for t in tasks
        if no_signal([run["score"] for runs in r["runs"][t].values() for run in runs])
    ]
    used = [t for t in tasks if t not in quiet]
    if not used:
        return "not shown", f"no task carries signal: {quiet}"
    methods = set(items[used[0]]["predictions"])
    pairs = [(a, b) for a, b in comparisons if a in methods and b in methods]
    seeds = len(items[used[0]]["predictions"][pairs[0][0]]) if pairs else 0
    if not pairs:
        return "not run yet", "none of the planned comparisons has both methods"
    metrics = [METRICS[next(iter(r["runs"][t].values()))[0]["metric"]] for t in used]
    references = [np.asarray(items[t]["reference"]) for t in used]

    def predictions(method: str) -> list[list[np.ndarray]]:
        return [
            [np.asarray(items[t]["predictions"][method][s]) for t in used] for s in range(seeds)
        ]

    tested = [
        paired_bootstrap(metrics, predictions(a), predictions(b), references) for a, b in pairs
    ]
    adjusted = holm([p for _, p in tested])
    found = [item_verdict(effect, p) for (effect, _), p in zip(tested, adjusted)]
    held = sum(v == "held" for v in found)
    text = (
        f"tasks with signal: {', '.join(used)}"
        + (f" (no signal, left out: {', '.join(quiet)})" if quiet else "")
        + f"; average over them, {seeds} seed(s) x evaluation items, paired bootstrap, Holm over "
        f"{len(pairs)} comparisons (alpha {ALPHA}): "
        + "; ".join(
            f"{a} vs {b} {100 * effect:+.2f} (p {p:.3f}, Holm {q:.3f}: {v})"
            for (a, b), (effect, p), q, v in zip(pairs, tested, adjusted, found)
        )
    )
    if held == len(found):
        return "held", text
    if held:
        return f"partly ({held} of {len(found)} held)", text
    return ("contradicted" if "contradicted" in found else "not shown"), text


def early_training_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Figure 2): EVA's loss is lower early than LoRA's, PiSSA's and OLoRA's.

    Its gradient norm is larger."""
    start = 20 if r["steps"] > 20 else r["steps"] // 2
    curves = r["curves"]
    if "per_seed" not in curves.get("eva", {}):
        return "not shown", "no per-seed curves in this result: rerun the script"
    loss = {
        i: [statistics.fmean(seed[start:]) for seed in c["per_seed"]["loss"]]
        for i, c in curves.items()
    }
    grad = {
        i: [statistics.fmean(seed[:5]) for seed in c["per_seed"]["grad_norm"]]
        for i, c in curves.items()
    }
    results = [
        (f"loss {i} - EVA (steps {start + 1}-{r['steps']})", *paired(loss[i], loss["eva"]))
        for i in curves
        if i != "eva"
    ]
    grads = [
        (f"grad norm EVA - {i} (steps 1-5)", *paired(grad["eva"], grad[i]))
        for i in curves
        if i != "eva"
    ]
    text = "; ".join(
        describe(name, v, mean, thr, scale=1.0, digits=4) for name, v, mean, thr in results + grads
    )
    return combine([v for _, v, _, _ in results]), text + " (verdict on the loss)"


def stability_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Figures 3/8): components mostly invariant to batch order and size.

    Small batches converge sooner."""
    means = r["orders"]["mean"]
    stable = next((k for k, v in enumerate(means) if v < 0.95), len(means))
    seconds = {int(bs): run["seconds"] for bs, run in r["size_runs"].items()}
    fastest = min(seconds, key=seconds.get)
    text = (
        f"top {stable} of {len(means)} components keep a mean abs(cos) >= 0.95 across orders "
        f"({', '.join(f'{v:.3f}' for v in means)}); fastest convergence at batch size {fastest} "
        f"({seconds[fastest]} s vs {seconds[max(seconds)]} s at {max(seconds)})"
    )
    verdict = "held" if stable == len(means) else "partly" if stable else "not shown"
    return verdict, text


def rank_distribution_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Figure 9): the ranks change most for rho < 1.5 and hardly above rho = 2."""
    moved = list(r["moved"].values())
    text = "share of the rank budget moved: " + ", ".join(
        f"rho {k} {v:.3f}" for k, v in r["moved"].items()
    )
    decreasing = all(a > b for a, b in zip(moved, moved[1:]))
    return (
        "held"
        if decreasing and moved[-1] < 0.05
        else "partly"
        if moved[0] == max(moved)
        else "not shown"
    ), text


def ablations_verdict(r: dict[str, Any]) -> Verdict:
    """Paper (Table 7): EVA beats whitening, permuted ranks, random rotation, redistributed LoRA."""
    if "per_seed" not in r:
        return "not shown", "no per-seed scores in this result: rerun the script"
    scores = r["per_seed"]
    from ablations import test_size

    items = test_size(r["quick"])
    results = [
        (f"EVA vs {name}", *paired(scores["eva"], other, items))
        for name, other in scores.items()
        if name != "eva"
    ]
    text = (
        f"EVA {100 * statistics.fmean(scores['eva']):.2f}; paired over {len(scores['eva'])} seeds: "
        + "; ".join(describe(name, v, mean, thr) for name, v, mean, thr in results)
    )
    return combine([v for _, v, _, _ in results]), text


def _lm_table(r: dict[str, Any], part: str) -> Verdict:
    """EVA beats LoRA and the weight-driven inits, EVA+DoRA beats DoRA, on the per-seed mean over
    the test sets that carry signal (paired over seeds)."""
    if part not in r.get("runs", {}):
        return "not run yet", f"the {part} part has not run"
    runs = r["runs"][part]
    tasks = list(next(iter(runs.values()))[0]["per_task"])
    quiet = [
        t
        for t in tasks
        if no_signal([res["per_task"][t] for results in runs.values() for res in results])
    ]
    used = [t for t in tasks if t not in quiet]
    if not used:
        return "not shown", (
            f"no test set carries signal (every run within {100 * NO_SIGNAL_RANGE:.0f} points): "
            + ", ".join(quiet)
        )
    score = {
        m: {res["seed"]: statistics.fmean(res["per_task"][t] for t in used) for res in results}
        for m, results in runs.items()
    }
    variants = [m for m in score if m.startswith("EVA rho")]
    if not variants:
        return "not run yet", f"no EVA run in the {part} part"
    # the EVA variant with the most seeds (a lucky single seed
    # must not stand for EVA), then the higher mean
    eva = max(variants, key=lambda m: (len(score[m]), statistics.fmean(score[m].values())))
    pairs = [(eva, b) for b in ("LoRA", "PiSSA", "OLoRA") if b in score]
    pairs += [("EVA+DoRA rho=2", "DoRA")] if {"EVA+DoRA rho=2", "DoRA"} <= set(score) else []
    # only same-seed runs pair
    pairs = [(a, b) for a, b in pairs if score[a].keys() & score[b].keys()]
    # each score is a mean over the used test sets of eval_limit
    # questions each: it counts that many items
    limit = r.get("settings", {}).get(part, {}).get("eval_limit")
    items = len(used) * limit if limit else None
    results = [
        (f"{a} vs {b}" + _seeds(n), v, mean, thr)
        for a, b in pairs
        for v, mean, thr, n in [paired_by_seed(score[a], score[b], items)]
    ]
    text = (
        f"test sets with signal: {', '.join(used)}"
        + (" (none left out)" if not quiet else f" (no signal, left out: {', '.join(quiet)})")
        + (f", {items} questions per seed" if items else "")
        + "; paired: "
        + "; ".join(describe(n, v, mean, thr) for n, v, mean, thr in results)
    )
    return combine([v for _, v, _, _ in results]), text


def _seeds(n: int) -> str:
    return f" ({n} seed{'s' if n > 1 else ''})"


def lm_math_verdict(r: dict[str, Any]) -> Verdict:
    return _lm_table(r, "math")


def lm_commonsense_verdict(r: dict[str, Any]) -> Verdict:
    return _lm_table(r, "commonsense")


def lm_code_verdict(r: dict[str, Any]) -> Verdict:
    return _lm_table(r, "code")


def lm_early_verdict(r: dict[str, Any]) -> Verdict:
    """Figure 2 on SmolLM2: EVA's loss over steps 6-20 below LoRA's, PiSSA's, OLoRA's; its gradient
    norm over steps 1-5 larger (paired over seeds, per part)."""
    found = []
    for part, runs in r.get("runs", {}).items():
        if "EVA rho=2" not in runs or any(
            len(res["loss"]) < 6 for results in runs.values() for res in results
        ):
            continue  # no EVA run, or logs too short for the windows (a --quick run)
        loss = {
            m: {res["seed"]: statistics.fmean(res["loss"][5:20]) for res in results}
            for m, results in runs.items()
        }
        grad = {
            m: {res["seed"]: statistics.fmean(res["grad_norm"][:5]) for res in results}
            for m, results in runs.items()
        }
        for other in ("LoRA", "PiSSA", "OLoRA"):
            if other in runs and loss[other].keys() & loss["EVA rho=2"].keys():
                v, mean, thr, n = paired_by_seed(loss[other], loss["EVA rho=2"])
                found.append((f"{part} loss {other} - EVA" + _seeds(n), v, mean, thr))
                v, mean, thr, n = paired_by_seed(grad["EVA rho=2"], grad[other])
                found.append((f"{part} grad norm EVA - {other}" + _seeds(n), v, mean, thr))
    if not found:
        return "not run yet", "no run with EVA rho=2"
    text = "; ".join(describe(n, v, mean, thr, scale=1.0, digits=4) for n, v, mean, thr in found)
    return combine([v for _, v, _, _ in found]), text


def vision_verdict(r: dict[str, Any]) -> Verdict:
    """EVA's test accuracy above LoRA's, paired over seeds (as for decision, rule in the script)."""
    from vision import verdict

    return verdict(r)


def glue_sweep_verdict(r: dict[str, Any]) -> Verdict:
    """Paper Table 4, each method at its rate chosen per task on validation (the plan's test)."""
    from glue_sweep import verdict

    return verdict(r)


def math_sweep_verdict(r: dict[str, Any]) -> Verdict:
    """Paper Table 3 with each method at its rate chosen on validation (the plan's test)."""
    from math_sweep import verdict

    return verdict(r)


def decision_verdict(r: dict[str, Any]) -> Verdict:
    """EVA's mean success over the held-out tasks with signal above LoRA's, paired over seeds."""
    from decision import verdict

    return verdict(r)


def evaluators_verdict(r: dict[str, Any]) -> Verdict:
    """Not a paper claim but the premise of the common-sense numbers: our evaluator scores as the
    authors' (lm-evaluation-harness) does, test set by test set, on one adapter."""
    rows = r["rows"]
    same = sum(x["identical generations"] for x in rows)
    total = sum(x["n"] for x in rows)
    gaps = [
        f"{x['test set']} {100 * (x['ours'] - x['lm-eval']):+.2f}"
        for x in rows
        if x["ours"] != x["lm-eval"]
    ]
    listed = ", ".join(gaps) if gaps else "none"
    text = f"{same} of {total} generations identical; accuracy gaps: {listed}"
    return ("held" if not gaps else "not held"), text


# (script stem, paper claim, rule)
CLAIMS: list[tuple[str, str, Callable[[dict[str, Any]], Verdict]]] = [
    (
        "table4",
        "Table 4: LoRA, EVA (rho 1, 2), PiSSA, OLoRA, DoRA, EVA+DoRA on GLUE",
        table4_verdict,
    ),
    (
        "glue_sweep",
        "Table 4 (GLUE): LoRA, EVA, PiSSA, OLoRA, each at its rate chosen per task on validation",
        glue_sweep_verdict,
    ),
    (
        "early_training",
        "Figure 2: loss and gradient norm over the first steps",
        early_training_verdict,
    ),
    (
        "stability",
        "Figures 3 / 8: components across batch orders and batch sizes",
        stability_verdict,
    ),
    (
        "rank_distribution",
        "Figure 9: rank distribution for rho in {1, 1.5, 2, 3}",
        rank_distribution_verdict,
    ),
    ("ablations", "Table 7: EVA vs EVA-whiten, EVA-perm, EVA-rot, LoRA-redist", ablations_verdict),
    (
        "math_sweep",
        "Table 3 (SmolLM2): GSM8K accuracy, each method at its rate chosen on validation",
        math_sweep_verdict,
    ),
    ("lm_generation", "Table 3 (SmolLM2): GSM8K accuracy", lm_math_verdict),
    ("lm_generation", "Table 2 (SmolLM2): common sense, 7 test sets", lm_commonsense_verdict),
    (
        "lm_generation",
        "Figure 2 (SmolLM2): loss and gradient norm over the first steps",
        lm_early_verdict,
    ),
    ("lm_generation", "Code (SmolLM2): HumanEval and MBPP pass@1, EVA vs LoRA", lm_code_verdict),
    (
        "vision",
        "Table 5 analogue (EfficientNet-Lite0 convs, digits): EVA vs LoRA accuracy",
        vision_verdict,
    ),
    (
        "decision",
        "Decision making (Meta-World, Decision Transformer): EVA vs LoRA success rate",
        decision_verdict,
    ),
    (
        "evaluators",
        "Evaluator check: ours scores as lm-evaluation-harness does (SmolLM2 adapter)",
        evaluators_verdict,
    ),
]

# the claims that set EVA against other initialisations (the rest check a property of EVA itself:
# stable components, the rank distribution, our evaluator)
AGAINST_OTHER_INITS = {
    "table4",
    "glue_sweep",
    "early_training",
    "ablations",
    "math_sweep",
    "lm_generation",
    "vision",
    "decision",
}
VERDICT_ORDER = ("held", "partly", "not shown", "contradicted")


def _comparison_counts(numbers: str) -> str:
    """ ": 2 comparisons held, 1 contradicted, 4 not shown" from a row's numbers (every rule ends a
    comparison with ": held)", ": not shown)" or ": contradicted)"), so a mixed row says which way
    its comparisons went; empty when the row names no single comparison. A check the row marks
    "not in the plan" (shown beside a planned test) is not counted."""
    found = [
        verdict
        for part in numbers.split("; ")
        if "not in the plan" not in part
        for verdict in re.findall(r": (held|not shown|contradicted)\)", part)
    ]
    if not found:
        return ""
    counts = [f"{found.count(v)} {v}" for v in ("held", "contradicted", "not shown") if v in found]
    plural = "s" if len(found) > 1 else ""
    return f": of {len(found)} comparison{plural}, " + ", ".join(counts)


def edge_summary(judged: list[dict[str, Any]]) -> str:
    """The plain answer to "where does EVA's edge survive?", computed from the table's verdicts.

    ``judged``: one dict per claim against other initialisations, with ``claim``, ``verdict`` (as
    in the table), ``numbers`` (the table's numbers, whose comparisons are counted), ``planned``
    (judged by a pre-registered test over items and seeds) and ``made_by`` (the last column).
    Claims are grouped by verdict, each marked with how it was judged and whether its result is as
    new as the code; nothing here is typed by hand, so a rerun that changes a verdict moves its
    claim."""
    groups: dict[str, list[str]] = {v: [] for v in VERDICT_ORDER}
    other: list[str] = []
    for row in judged:
        how = "pre-registered test" if row["planned"] else "seeds only"
        age = row["made_by"].split(" ", 1)[0].rstrip(":")  # current | stale | unstamped | commit
        age = "made by a commit unknown here" if age == "commit" else age
        if row.get("quick"):
            age += ", quick run"
        entry = f"{row['claim']} ({how}; {age})"
        verdict = row["verdict"]
        key = "partly" if verdict.startswith("partly") else verdict
        if key in groups:
            groups[key].append(entry + _comparison_counts(row.get("numbers", "")))
        else:
            other.append(f"{entry}: {verdict}")
    lines = [
        "**Where EVA's edge survives** (computed from the table above, claims that set EVA "
        "against other initialisations; a stale or unstamped result was made by older code):",
        "",
    ]
    titles = {
        "held": "Held",
        "partly": "Mixed (some comparisons held; the counts say how the others went)",
        "not shown": "Not shown (no difference the test can tell from noise)",
        "contradicted": "Contradicted outright",
    }
    for key in VERDICT_ORDER:
        lines.append(f"- {titles[key]}:{'' if groups[key] else ' none'}")
        lines.extend(f"  - {entry}" for entry in groups[key])
    if other:
        lines.append("- Not judged:")
        lines.extend(f"  - {entry}" for entry in other)
    return "\n".join(lines) + "\n\n"


INTRO = """# The paper's claims at small scale \
(MiniLM, SmolLM2-135M, EfficientNet-Lite0, a Decision Transformer)

Every section below is written by a script in this folder; `report.py` assembles them and computes
the verdicts from the scripts' JSON (rules in `report.py`, the comparison in `verdicts.py`): a claim
"A beats B" is **held** only when the mean paired difference over seeds exceeds the one-sided 95 %
paired-t threshold (given with each number), **contradicted** when it is that far the other way,
**not shown** otherwise; where scores count test items (accuracy, success over episodes) the
difference must also add up to at least 5 items net over the seeds (fewer cannot pass an exact sign
test at 5 %; the threshold shown includes this floor); tasks where every run of every method lies
within 2 points carry no signal and are left out. Machine: 2 CPU cores, torch 2.13.0 CPU; no GPU
was lent for these runs. A section from a `--quick` run is marked as such and proves nothing.

Experiments with a pre-registered plan (`plans/*.json`: tasks, seeds, methods, rates and the test,
committed before the runs) are judged by the plan's test over test items *and* seeds: the exact
McNemar test on the items two methods disagree on, pooled over seeds (vision), a paired
bootstrap over seeds and items (Table 4), or a nested bootstrap over tasks, seeds and episodes
(Meta-World: a task, not an episode, is the unit that decides), with Holm's correction across a
table's comparisons (`item_tests.py`).
Their result is refused when it records no plan, when the plan changed after it, or when the commit
that made it did not yet hold the plan (`plans.py`).

A result made before the last change to the code it depends on is marked stale in the last
column (each JSON records its git commit, library versions and date since 2026-12-05; a result that
also records the package modules its runs loaded depends on those and the package's data files,
any other on all of `src/eva_lora`).

| claim | here | numbers | made by |
|---|---|---|---|
"""


def freshness(record: dict[str, Any]) -> str:
    """Whether a result was made by the code as it is: "current", "stale: ..." or "unstamped"."""
    from common import git

    made = (record.get("provenance") or {}).get("git_commit")
    if not made:
        return "unstamped (made before results recorded their commit)"
    paths = dependencies(record)
    latest = git("log", "-1", "--format=%H", "--", *paths)
    if latest is None or git("cat-file", "-t", made) != "commit":
        return f"commit {made[:10]} unknown here"
    if git("merge-base", "--is-ancestor", latest, made) is None:
        if not code_changed(made, paths):
            return f"current ({made[:10]}; only docstrings and comments changed since)"
        return f"stale: made at {made[:10]}, the code changed since ({latest[:10]})"
    dirty = record["provenance"].get("code_changes_uncommitted")
    return f"current ({made[:10]}{', with uncommitted code changes' if dirty else ''})"


def dependencies(record: dict[str, Any]) -> tuple[str, ...]:
    """The code a result depends on: the package's modules its run loaded (recorded by
    ``common.write_results``) and the package's data files; the whole package for a result that
    does not say."""
    from common import CODE_PATHS, git

    loaded = (record.get("provenance") or {}).get("code_files")
    if not loaded:
        return CODE_PATHS
    data = (git("ls-files", "--", *CODE_PATHS) or "").splitlines()
    return tuple(sorted(set(loaded) | {f for f in data if not f.endswith(".py")}))


def plan_refusal(stem: str, record: dict[str, Any]) -> str | None:
    """Why a full result of an experiment with a pre-registered plan is not judged, or None."""
    if record.get("quick") or not plans.plan_path(stem).is_file():
        return None
    return plans.check(record)


def code_changed(made: str, paths: tuple[str, ...], until: str = "HEAD") -> bool:
    """Whether a Python file under ``paths`` differs between ``made`` and ``until`` in more than its
    docstrings, comments and layout (their syntax trees, docstrings removed, are compared): a
    reworded docstring does not make a result stale."""
    import ast

    from common import git

    changed = git("diff", "--name-only", made, until, "--", *paths)
    if changed is None:
        return True

    def tree(commit: str, file: str) -> str | None:
        text = git("show", f"{commit}:{file}")
        if text is None:
            return None
        parsed = ast.parse(text)
        for node in ast.walk(parsed):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        return ast.dump(parsed)

    for file in filter(None, changed.splitlines()):
        if not file.endswith(".py"):
            return True
        before, after = tree(made, file), tree(until, file)
        if before is None or after is None or before != after:
            return True
    return False


def main(results: Path = HERE / "results", report: Path = HERE / "REPORT.md") -> str:
    rows, sections, judged = [], [], []
    for stem, claim, rule in CLAIMS:
        section, data = results / f"{stem}.md", results / f"{stem}.json"
        if not (section.is_file() and data.is_file()):
            rows.append(f"| {claim} | not run yet | - | - |")
            if stem in AGAINST_OTHER_INITS:
                judged.append(
                    {"claim": claim, "verdict": "not run yet", "planned": False, "made_by": "-"}
                )
            continue
        record = json.loads(data.read_text(encoding="utf-8"))
        refused = plan_refusal(stem, record)
        verdict, numbers = ("refused", refused) if refused else rule(record)
        made_by = freshness(record)
        rows.append(
            f"| {claim} | {verdict}{' (quick run)' if record.get('quick') else ''} | {numbers} | "
            f"{made_by} |"
        )
        if stem in AGAINST_OTHER_INITS:
            judged.append(
                {
                    "claim": claim,
                    "verdict": verdict,
                    "planned": plans.plan_path(stem).is_file() and not record.get("quick"),
                    "made_by": made_by,
                    "quick": bool(record.get("quick")),
                    "numbers": numbers,
                }
            )
        text = section.read_text(encoding="utf-8")
        if text not in sections:  # one script can back several claims
            sections.append(text)
    text = INTRO + "\n".join(rows) + "\n\n" + edge_summary(judged) + "\n".join(sections)
    atomic_write_text(report, text)
    print(report)
    return text


if __name__ == "__main__":
    main()
