"""GLUE tasks from the local files in their original layouts (see ``../shared/data/glue``).

Metrics as in the paper (Table 4): Matthews correlation for CoLA, Pearson for STS-B, accuracy
otherwise (plus F1 for MRPC); computed with scikit-learn / SciPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import DataError, Task, load_table, rename


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score

    return {"accuracy": float(accuracy_score(references, predictions))}


def accuracy_f1(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {**accuracy(predictions, references), "f1": float(f1_score(references, predictions))}


def matthews(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    from sklearn.metrics import matthews_corrcoef

    return {
        "matthews": float(matthews_corrcoef(references, predictions)),
        **accuracy(predictions, references),
    }


def correlations(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(set(map(float, predictions))) < 2:  # a constant prediction has no correlation
        return {"pearson": 0.0, "spearman": 0.0}
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearman": float(spearmanr(predictions, references)[0]),
    }


def _int_labels(data: Any, path: Path, valid: set[int]) -> Any:
    bad = sorted({v for v in data["label"] if v not in valid}, key=str)
    if bad:
        raise DataError(f"{path}: labels must be in {sorted(valid)}, found {bad[:5]}")
    return data


def read_sst2(path: Path, split: str) -> Any:
    """``label<TAB>sentence`` without a header (SentEval layout)."""
    data = load_table(path, ["label", "text"], header=False)
    return _int_labels(data, path, {0, 1})


def read_cola(path: Path, split: str) -> Any:
    """``sentence<TAB>label`` without a header."""
    data = load_table(path, ["text", "label"], header=False)
    return _int_labels(data, path, {0, 1})


def read_rte(path: Path, split: str) -> Any:
    """GLUE export with a header: sentence1, sentence2, label (0 = entailment), idx."""
    data = rename(
        load_table(path), {"sentence1": "text", "sentence2": "text_pair", "label": "label"}, path
    )
    return _int_labels(data, path, {0, 1})


def read_mrpc(path: Path, split: str) -> Any:
    """Original MSR files: Quality, #1 ID, #2 ID, #1 String, #2 String (1 = paraphrase)."""
    data = rename(
        load_table(path), {"Quality": "label", "#1 String": "text", "#2 String": "text_pair"}, path
    )
    return _int_labels(data, path, {0, 1})


def read_stsb(path: Path, split: str) -> Any:
    """GLUE layout: ..., sentence1, sentence2, score (0-5), read as a float label."""
    data = rename(
        load_table(path), {"sentence1": "text", "sentence2": "text_pair", "score": "label"}, path
    )
    return data.map(lambda row: {"label": float(row["label"])})


GLUE_TASKS = {
    "sst2": Task(
        "sst2",
        "classification",
        {
            "train": "glue/SST-2/train_sentences.tsv",
            "eval": "glue/SST-2/test_sentences_labeled.tsv",
        },
        read_sst2,
        accuracy,
        "accuracy",
        num_labels=2,
        description="SST-2 sentiment (accuracy)",
        bundled={"train": "sst2_train_1000.tsv", "eval": "sst2_test_300.tsv"},
    ),
    "cola": Task(
        "cola",
        "classification",
        {"train": "glue/CoLA/train_tok.tsv", "eval": "glue/CoLA/dev_outdomain_tok.tsv"},
        read_cola,
        matthews,
        "matthews",
        num_labels=2,
        description="CoLA acceptability (Matthews)",
    ),
    "rte": Task(
        "rte",
        "classification",
        {"train": "glue/RTE/train.tsv", "eval": "glue/RTE/dev.tsv"},
        read_rte,
        accuracy,
        "accuracy",
        num_labels=2,
        description="RTE entailment (accuracy)",
    ),
    "mrpc": Task(
        "mrpc",
        "classification",
        {
            "train": "glue/MRPC/msr_paraphrase_train.txt",
            "eval": "glue/MRPC/msr_paraphrase_test.txt",
        },
        read_mrpc,
        accuracy_f1,
        "accuracy",
        num_labels=2,
        description="MRPC paraphrase (accuracy, F1)",
    ),
    "stsb": Task(
        "stsb",
        "regression",
        {"train": "glue/STS-B/train.tsv", "eval": "glue/STS-B/dev.tsv"},
        read_stsb,
        correlations,
        "pearson",
        num_labels=1,
        description="STS-B similarity (Pearson)",
    ),
}
