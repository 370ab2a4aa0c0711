"""Generation tasks: math (GSM8K, MATH) and common-sense reasoning (LLM-Adapters format).

Prompts follow the paper (Table 8 and the MetaMathQA Alpaca template); answers are extracted
from greedy generations and compared: numbers numerically (GSM8K), LaTeX with ``math-verify``
(MATH), labels after "the correct answer is" (common sense).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import DataError, Task, load_table

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca(instruction: str) -> str:
    return ALPACA.format(instruction=instruction.strip())


# ---- math ----------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> str | None:
    """GSM8K answer: after "The answer is" / "####" if present, else the last number in the text."""
    for marker in ("The answer is:", "The answer is", "####"):
        if marker in text:
            numbers = _NUMBER.findall(text.split(marker)[-1])
            if numbers:
                return _clean_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def _clean_number(raw: str) -> str:
    value = raw.replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def numbers_equal(prediction: str | None, reference: str) -> bool:
    if prediction is None:
        return False
    try:
        return abs(float(prediction) - float(reference)) <= 1e-6 * max(1.0, abs(float(reference)))
    except ValueError:
        return prediction.strip() == reference.strip()


def extract_boxed(text: str) -> str | None:
    """MATH answer: the content of the last ``\\boxed{...}`` (braces balanced), else after
    "The answer is"."""
    start = text.rfind("\\boxed")
    if start >= 0:
        i = text.find("{", start)
        if i >= 0:
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j].strip()
    if "The answer is" in text:
        return text.split("The answer is")[-1].lstrip(": ").strip().rstrip(".").strip("$ ") or None
    return None


def latex_equal(prediction: str | None, reference: str) -> bool:
    """Mathematical equivalence with HF's ``math-verify`` (sympy based); exact match as fallback."""
    if prediction is None:
        return False
    if prediction.strip() == reference.strip():
        return True
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"${reference}$"), parse(f"${prediction}$")))
    # math-verify raises on LaTeX it cannot parse: count as wrong, never crash an eval
    except Exception:
        return False


def gsm8k_score(predictions: Sequence[str | None], references: Sequence[str]) -> dict[str, float]:
    correct = [numbers_equal(p, r) for p, r in zip(predictions, references)]
    return {"accuracy": sum(correct) / max(len(correct), 1)}


def math_score(predictions: Sequence[str | None], references: Sequence[str]) -> dict[str, float]:
    correct = [latex_equal(p, r) for p, r in zip(predictions, references)]
    return {"accuracy": sum(correct) / max(len(correct), 1)}


def read_gsm8k(path: Path, split: str) -> Any:
    """GSM8K (question, answer ending in ``#### n``) or MetaMathQA (query, response ending in
    "The answer is: n")."""
    data = load_table(path)
    if {"query", "response"} <= set(data.column_names):

        def convert(row):
            return {
                "prompt": alpaca(row["query"]),
                "response": row["response"],
                "answer": extract_number(row["response"]) or "",
            }
    elif {"question", "answer"} <= set(data.column_names):

        def convert(row):
            reasoning, _, final = row["answer"].rpartition("####")
            final = _clean_number(final.strip())
            reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
            return {
                "prompt": alpaca(row["question"]),
                "response": f"{reasoning}\nThe answer is: {final}",
                "answer": final,
            }
    else:
        raise DataError(
            f"{path}: a math file needs columns question/answer (GSM8K) or query/response "
            f"(MetaMathQA); it has {data.column_names}"
        )
    return data.map(convert, remove_columns=data.column_names)


def read_math(path: Path, split: str) -> Any:
    """MATH (problem, solution with ``\\boxed{}``, optional answer)."""
    data = load_table(path)
    if not {"problem", "solution"} <= set(data.column_names):
        raise DataError(
            f"{path}: a MATH file needs columns problem/solution; it has {data.column_names}"
        )

    def convert(row):
        answer = row.get("answer") or extract_boxed(row["solution"]) or ""
        return {
            "prompt": alpaca(row["problem"]),
            "response": f"{row['solution']}\nThe answer is: {answer}",
            "answer": answer,
        }

    return data.map(convert, remove_columns=data.column_names)


# ---- common sense --------------------------------------------------------------------------------
_CHOICE = re.compile(
    r"the correct answer is\s*:?\s*(true|false|solution\d|answer\d|option\d|ending\d)",
    re.IGNORECASE,
)


def extract_choice(text: str) -> str | None:
    """Label after "the correct answer is", else the first label-like word (as in LLM-Adapters)."""
    match = _CHOICE.search(text)
    if match:
        return match.group(1).lower()
    match = re.search(
        r"\b(true|false|solution\d|answer\d|option\d|ending\d)\b", text, re.IGNORECASE
    )
    return match.group(1).lower() if match else None


def choice_score(predictions: Sequence[str | None], references: Sequence[str]) -> dict[str, float]:
    correct = [p is not None and p == r.strip().lower() for p, r in zip(predictions, references)]
    return {"accuracy": sum(correct) / max(len(correct), 1)}


def read_commonsense(path: Path, split: str) -> Any:
    """LLM-Adapters files (instruction, input, output, answer).

    A directory is the joint training set."""
    import datasets

    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no *.json file to build the common-sense training set from")
    parts = []
    for file in files:
        data = load_table(file)
        missing = [c for c in ("instruction", "output", "answer") if c not in data.column_names]
        if missing:
            raise DataError(f"{file} lacks column(s) {missing}; it has {data.column_names}")
        parts.append(
            data.map(
                lambda row: {
                    "prompt": alpaca(row["instruction"]),
                    "response": row["output"],
                    "answer": str(row["answer"]).strip().lower(),
                },
                remove_columns=data.column_names,
            )
        )
    return datasets.concatenate_datasets(parts)


COMMONSENSE_TESTS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_i_qa",
    "winogrande": "winogrande",
    "arc-e": "ARC-Easy",
    "arc-c": "ARC-Challenge",
    "obqa": "openbookqa",
}

GENERATION_TASKS = {
    "gsm8k": Task(
        "gsm8k",
        "generation",
        {"train": "gsm8k/train.jsonl", "eval": "gsm8k/test.jsonl"},
        read_gsm8k,
        gsm8k_score,
        "accuracy",
        description="GSM8K (MetaMathQA schema accepted)",
        extract=extract_number,
        bundled={"train": "gsm8k_train_2000.jsonl", "eval": "gsm8k_test_300.jsonl"},
    ),
    "math": Task(
        "math",
        "generation",
        {"train": "gsm8k/train.jsonl", "eval": "math/test.jsonl"},
        lambda p, s: read_gsm8k(p, s) if s == "train" else read_math(p, s),
        math_score,
        "accuracy",
        description="MATH (trained on the math set: GSM8K / MetaMathQA schema)",
        extract=extract_boxed,
    ),
    "commonsense": Task(
        "commonsense",
        "generation",
        {"train": "commonsense/train_parts"},
        read_commonsense,
        choice_score,
        "accuracy",
        description="joint common-sense set; eval = the 7 tasks",
        extract=extract_choice,
        parts=tuple(COMMONSENSE_TESTS),
    ),
    **{
        name: Task(
            name,
            "generation",
            {"train": "commonsense/train_parts", "eval": f"commonsense/{folder}/test.json"},
            read_commonsense,
            choice_score,
            "accuracy",
            description=f"common sense: {folder}",
            extract=extract_choice,
        )
        for name, folder in COMMONSENSE_TESTS.items()
    },
}
