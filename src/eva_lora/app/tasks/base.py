"""What every benchmark task provides, and loading local files through ``datasets``.

A task turns local files into a ``datasets.Dataset`` with normalised columns:
- classification / regression (GLUE): ``text``, optional ``text_pair``, ``label``;
- generation (math, common sense, code): ``prompt``, ``response`` (training target) and ``answer``
  (the reference the evaluator compares with); training data may instead be conversations, a
  ``messages`` column of role/content turns (code).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"


SUBSET_SEED = 0  # train_limit / eval_limit subsets do not depend on the run's seed


def subset_indices(n: int, k: int, seed: int = SUBSET_SEED) -> list[int]:
    """``k`` of ``range(n)``, drawn without replacement with a fixed seed, in file order."""
    import torch

    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


# the held-out rows do not depend on the run's seed (and differ from the limit's draw)
VALIDATION_SEED = 1


def split_validation(data: Any, fraction: float) -> tuple[Any, Any]:
    """(fit, validation): ``fraction`` of the training rows held out with a fixed seed; file order.

    Choices made on the validation rows (a learning rate, a variant) never see the test set."""
    n = len(data)
    held = max(1, round(n * fraction))
    if held >= n:
        raise DataError(f"a validation fraction of {fraction} leaves no training row of {n}")
    valid = subset_indices(n, held, VALIDATION_SEED)
    keep = sorted(set(range(n)) - set(valid))
    return data.select(keep), data.select(valid)


class DataError(ValueError):
    """A data file that is missing, in an unknown format, or lacks a needed column."""


@dataclass(frozen=True)
class Task:
    """One benchmark: where its files are, how to read them, and how to score predictions.

    kind: "classification" (num_labels classes), "regression" (one score) or "generation".
    files: split -> path relative to the data directory.
    read: (path, split) -> Dataset with the normalised columns.
    score: (predictions, references) -> {metric: value}; ``main_metric`` names the headline one.
    extract: generation only: the answer in a model's text (None when it has none).
    parts: a joint task evaluated as several tasks (common sense: its 7 test sets), by name.
    chat: prompts are a user turn, rendered with the tokenizer's chat template (code tasks).
    """

    name: str
    kind: str
    files: dict[str, str]
    read: Callable[[Path, str], Any]
    score: Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]
    main_metric: str
    num_labels: int = 1
    description: str = ""
    bundled: dict[str, str] = field(default_factory=dict)  # split -> file shipped in the package
    extract: Callable[[str], str | None] | None = None
    parts: tuple[str, ...] = ()
    chat: bool = False

    def path(self, split: str, data_dir: str | Path | None) -> Path:
        """The file of ``split``: under ``data_dir`` if given, else eva-lora's bundled copy."""
        if split not in self.files:
            raise DataError(f"task {self.name} has no {split!r} split; it has {sorted(self.files)}")
        if data_dir is None:
            if split in self.bundled:
                return BUNDLED_DATA / self.bundled[split]
            raise DataError(
                f"task {self.name}: no data directory given and no bundled {split} file; pass "
                f"--data-dir (a folder with {self.files[split]}) or --{split}-file"
            )
        return Path(data_dir) / self.files[split]

    def load(
        self,
        split: str,
        data_dir: str | Path | None = None,
        file: str | Path | None = None,
        limit: int | None = None,
    ) -> Any:
        """Dataset of ``split``, read from ``file`` or the data dir; at most ``limit`` rows.

        ``limit`` keeps a random subset drawn with a fixed seed (``SUBSET_SEED``), in file order:
        the same rows for every run, init and seed, so runs stay comparable. Not the first rows,
        because GLUE files are sorted by genre (STS-B) or grouped by label, and a prefix would be
        biased.
        """
        path = Path(file) if file is not None else self.path(split, data_dir)
        if not path.exists():
            raise DataError(f"task {self.name}: data file not found: {path}")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"task {self.name}: {path} is empty")
        try:
            data = self.read(path, split)
        except DataError:
            raise
        # datasets / pyarrow / pandas parse errors have no common base class
        except Exception as err:
            cause = str(err.__cause__ or err).strip().splitlines()
            raise DataError(
                f"task {self.name}: {path} cannot be parsed ({type(err.__cause__ or err).__name__}"
                f"{': ' + cause[0][:160] if cause else ''})"
            ) from None
        required = (
            ("prompt", "response", "answer") if self.kind == "generation" else ("text", "label")
        )
        if self.kind == "generation" and split == "train" and "messages" in data.column_names:
            required = ("messages",)  # conversations: the chat template renders them
        missing = [c for c in required if c not in data.column_names]
        if missing:
            raise DataError(
                f"task {self.name}: {path} lacks column(s) {missing}; it has {data.column_names}"
            )
        if len(data) == 0:
            raise DataError(f"task {self.name}: {path} holds no example")
        if limit is not None and limit < len(data):
            if limit < 1:
                raise DataError(f"task {self.name}: a row limit must be >= 1, got {limit}")
            data = data.select(subset_indices(len(data), limit))
        return data


def load_table(path: Path, columns: Sequence[str] | None = None, header: bool = True) -> Any:
    """Read json/jsonl/csv/tsv/parquet with ``datasets`` (local file, no hub, no cache clutter).

    Tab-separated files are read with quoting off: GLUE text contains bare quote characters.
    """
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # we say it once
    datasets.logging.get_logger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in (".json", ".jsonl"):
        data = datasets.load_dataset("json", data_files=str(path), split="train")
    elif suffix == ".parquet":
        data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif suffix in (".tsv", ".txt", ".csv"):
        options: dict[str, Any] = {"sep": "," if suffix == ".csv" else "\t"}
        if suffix != ".csv":
            options.update(quoting=csv.QUOTE_NONE, encoding="utf-8-sig")
        if not header:
            options.update(header=None, names=list(columns or []))
        data = datasets.load_dataset("csv", data_files=str(path), split="train", **options)
    else:
        raise DataError(
            f"unsupported data file type {path.suffix!r} ({path}); use json, jsonl, csv, tsv or "
            "parquet"
        )
    if columns is not None and header:
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise DataError(f"{path} lacks column(s) {missing}; it has {data.column_names}")
    return data


def rename(data: Any, mapping: dict[str, str], path: Path) -> Any:
    """Rename source columns to the normalised names, with a clear error for a missing one."""
    missing = [c for c in mapping if c not in data.column_names]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it has {data.column_names}")
    keep = [c for c in data.column_names if c in mapping]
    data = data.select_columns(keep)
    return data.rename_columns({k: v for k, v in mapping.items() if k != v})
