"""Code: HumanEval and MBPP scored by running their tests in the sandbox; chat fine-tuning data.

Evaluation prompts are the instruct form that chat models are evaluated with (as in EvalPlus and the
DeepSeek-Coder evaluation): the problem goes into one user turn, rendered with the tokenizer's chat
template, and the program is the first fenced Python block of the greedy answer (or the whole
answer when it has no fence). HumanEval's program is the task's prompt (imports and signature) plus
that code, so a bare function body and a full re-definition both work; then the task's ``check``.
MBPP's program is the code, then the task's asserts.

Training data is a conversation per example (``messages``: a list of ``{"role", "content"}``, as in
Code-Feedback). Only the assistant's turns are trained, and EVA's label mask sees exactly those
tokens. Code-Feedback is not available offline, so the bundled training set is MBPP's train split
(task ids 601-974) as one user turn (problem + its tests) and one assistant turn (the reference
solution in a fence). Point ``--train-file`` at any JSON/JSONL file with a ``messages`` column.

A reference (the ``answer`` column) is JSON: ``{"prefix": code run before the candidate, "test":
code run after it}``; scoring runs ``prefix + candidate`` then ``test`` in a fresh sandboxed
process.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import DataError, Task, load_table

MBPP_SPLITS = {
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
    "prompt": range(1, 11),
}
_FENCE = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The first fenced code block in ``text`` (an unclosed one runs to the end), else ``text``."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).rstrip() + "\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def humaneval_program(prompt: str, code: str, entry_point: str) -> str:
    """The candidate as a module: the prompt (imports, signature, docstring) then the code.

    A model may answer with the body only, or with the whole function (imports included); the
    prompt's function has a docstring body, so a later full definition simply replaces it.
    """
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return f"{prompt.rstrip()}\n    pass\n\n\n{code}"
    return prompt + code


def score_programs(
    predictions: Sequence[str | Sequence[str] | None],
    references: Sequence[str],
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """pass@k over problems: each prediction is a code string (one sample) or a list of samples.

    Every candidate runs in its own sandboxed process (see ``eva_lora.app.sandbox``); a missing
    prediction counts as a failure.
    """
    from ..sandbox import run_many

    samples = [[p] if isinstance(p, str) or p is None else list(p) for p in predictions]
    jobs, owners = [], []
    for i, (candidates, reference) in enumerate(zip(samples, references)):
        ref = json.loads(reference)
        for code in candidates:
            jobs.append((_program(ref, code), ref["test"]))
            owners.append(i)
    results = run_many(jobs)
    passed = [0] * len(samples)
    for owner, result in zip(owners, results):
        passed[owner] += int(result.passed)
    metrics = {}
    for k in ks:
        usable = [(len(c), p) for c, p in zip(samples, passed) if len(c) >= k]
        if usable:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in usable) / len(usable)
    return metrics


def _program(reference: dict[str, str], code: str | None) -> str:
    if code is None:
        return "raise SystemExit('no code in the answer')\n"
    if reference.get("entry_point"):
        return humaneval_program(reference["prefix"], code, reference["entry_point"])
    return reference.get("prefix", "") + code


def code_score(predictions: Sequence[Any], references: Sequence[str]) -> dict[str, float]:
    """pass@1 (greedy answers); pass@k too when every prediction is a list of at least k samples."""
    sizes = {len(p) for p in predictions if not isinstance(p, str) and p is not None}
    ks = [1] + [k for k in (5, 10) if sizes and min(sizes) >= k]
    return score_programs(predictions, references, ks)


# ---- readers -------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_humaneval(path: Path, split: str) -> Any:
    """HumanEval (task_id, prompt, test, entry_point): the prompt in a user turn.

    Scored by ``check``."""
    import datasets

    rows = _read_jsonl(path)
    missing = [c for c in ("prompt", "test", "entry_point") if rows and c not in rows[0]]
    if missing:
        raise DataError(
            f"{path}: a HumanEval file needs prompt/test/entry_point; it lacks {missing}"
        )
    return datasets.Dataset.from_list(
        [
            {
                "prompt": "Complete the following Python function. "
                "Answer with the whole function in a ```python "
                f"block.\n```python\n{r['prompt']}```",
                "response": r.get("canonical_solution", ""),
                "answer": json.dumps(
                    {
                        "prefix": r["prompt"],
                        "entry_point": r["entry_point"],
                        "test": f"{r['test']}\n\ncheck({r['entry_point']})\n",
                    }
                ),
            }
            for r in rows
        ]
    )


def mbpp_user_turn(text: str, tests: Sequence[str]) -> str:
    """MBPP's problem as the usual harnesses phrase it: the description and the tests to pass."""
    return f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests)


def _mbpp_rows(path: Path, split: str) -> list[dict[str, Any]]:
    rows = _read_jsonl(path)
    text_key = "text" if rows and "text" in rows[0] else "prompt"
    test_key = "test_list" if rows and "test_list" in rows[0] else "test"
    if not rows or any(k not in rows[0] for k in (text_key, test_key, "code", "task_id")):
        raise DataError(
            f"{path}: an MBPP file needs task_id, text (or prompt), test_list (or test) and code"
        )
    ids = MBPP_SPLITS["test" if split == "eval" else "train"]
    # a file holding one split only (e.g. mbpp_test.jsonl)
    if len({r["task_id"] for r in rows} & set(ids)) == 0:
        ids = range(0, 10**9)
    return [
        {
            "text": r[text_key],
            "tests": list(r[test_key]),
            "code": r["code"].replace("\r\n", "\n"),
            "setup": r.get("test_setup_code", ""),
        }
        for r in rows
        if r["task_id"] in ids
    ]


def read_mbpp(path: Path, split: str) -> Any:
    """MBPP: eval = the test split (task ids 11-510); train = task ids 601-974 as conversations."""
    import datasets

    rows = _mbpp_rows(path, split)
    if split == "train":
        return datasets.Dataset.from_list([{"messages": mbpp_conversation(r)} for r in rows])
    return datasets.Dataset.from_list(
        [
            {
                "prompt": mbpp_user_turn(r["text"], r["tests"]),
                "response": r["code"],
                "answer": json.dumps(
                    {
                        "prefix": "",
                        "test": (r["setup"] + "\n" if r["setup"] else "")
                        + "\n".join(r["tests"])
                        + "\n",
                    }
                ),
            }
            for r in rows
        ]
    )


def mbpp_conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": mbpp_user_turn(row["text"], row["tests"])},
        {"role": "assistant", "content": f"```python\n{row['code'].strip()}\n```"},
    ]


def read_conversations(path: Path, split: str) -> Any:
    """Training conversations: a ``messages`` column (Code-Feedback, ShareGPT-like) or MBPP rows."""
    if path.suffix in (".jsonl", ".json", ".parquet") and not _looks_like_mbpp(path):
        data = load_table(path)
        if "messages" not in data.column_names:
            raise DataError(
                f"{path}: a conversation file needs a 'messages' column (a list of role/content "
                f"turns); it has {data.column_names}"
            )
        check_conversations(data["messages"], path)
        return data.select_columns(["messages"])
    return read_mbpp(path, split)


def _looks_like_mbpp(path: Path) -> bool:
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline() or "{}")
    return "code" in first and "task_id" in first


def check_conversations(conversations: Sequence[Any], path: Path | str) -> None:
    """Each conversation: a non-empty list of {role, content} with at least one assistant turn."""
    for i, turns in enumerate(conversations):
        if not turns or not all(
            isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns
        ):
            raise DataError(
                f"{path}: conversation {i} is not a non-empty list of {{role, content}} turns"
            )
        if not any(t["role"] == "assistant" for t in turns):
            raise DataError(
                f"{path}: conversation {i} has no assistant turn, so nothing would be trained"
            )


CODE_TASKS = {
    "code": Task(
        "code",
        "generation",
        {"train": "code/mbpp.jsonl"},
        read_conversations,
        code_score,
        "pass@1",
        description="chat fine-tuning (MBPP train as conversations, or any messages file); "
        "eval = HumanEval + MBPP",
        bundled={"train": "mbpp.jsonl"},
        extract=extract_code,
        parts=("humaneval", "mbpp"),
        chat=True,
    ),
    "humaneval": Task(
        "humaneval",
        "generation",
        {"eval": "code/HumanEval.jsonl.gz"},
        read_humaneval,
        code_score,
        "pass@1",
        description="HumanEval (164 problems), pass@1 by sandboxed execution",
        bundled={"eval": "HumanEval.jsonl.gz"},
        extract=extract_code,
        chat=True,
    ),
    "mbpp": Task(
        "mbpp",
        "generation",
        {"train": "code/mbpp.jsonl", "eval": "code/mbpp.jsonl"},
        read_conversations,
        code_score,
        "pass@1",
        description="MBPP test split (500 problems), pass@1 by sandboxed execution",
        bundled={"train": "mbpp.jsonl", "eval": "mbpp.jsonl"},
        extract=extract_code,
        chat=True,
    ),
}
