"""Tokenisation, label masking and batching for the recipes.

Generation examples are ``prompt + response + eos`` with the prompt's labels set to -100, so only
the response is trained (and, with ``EvaConfig.use_label_mask``, only response tokens enter EVA's
PCA). Conversations (a ``messages`` column) are rendered with the tokenizer's chat template, and
only the assistant turns keep their labels (``encode_conversation``). Over-long examples are either
dropped or truncated, and the count is always reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass
class Prepared:
    """A tokenised dataset and what happened to over-long examples."""

    dataset: Any
    kept: int
    dropped: int
    truncated: int


def tokenize(data: Any, tokenizer: Any, kind: str, max_length: int, drop_long: bool) -> Prepared:
    """Tokenise a task dataset (normalised columns) for training; see the module docstring."""
    if kind == "generation" and "messages" in data.column_names:
        encoded = data.map(
            lambda row: encode_conversation(row["messages"], tokenizer),
            remove_columns=data.column_names,
        )
    elif kind == "generation":
        encoded = data.map(
            lambda row: _encode_generation(row, tokenizer), remove_columns=data.column_names
        )
    else:
        encoded = data.map(
            lambda row: encode_pair(row, tokenizer), remove_columns=data.column_names
        )
    lengths = [len(ids) for ids in encoded["input_ids"]]
    long = sum(n > max_length for n in lengths)
    if drop_long:
        keep = [i for i, n in enumerate(lengths) if n <= max_length]
        if not keep:
            raise ValueError(
                f"every example is longer than max_length={max_length}; raise max_length"
            )
        encoded = encoded.select(keep)
        return Prepared(encoded, len(keep), long, 0)
    if long:
        warnings.warn(
            f"{long} of {len(lengths)} examples are longer than max_length={max_length} and were "
            "truncated (set drop_long=true to drop them instead)",
            RuntimeWarning,
            stacklevel=2,
        )
        encoded = encoded.map(
            lambda row: {k: v[:max_length] if isinstance(v, list) else v for k, v in row.items()}
        )
    return Prepared(encoded, len(lengths), 0, long)


def encode_pair(
    row: dict[str, Any], tokenizer: Any, max_length: int | None = None
) -> dict[str, Any]:
    """A classification example (text, [text_pair], label) as token ids, truncated when asked."""
    options = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    enc = tokenizer(row["text"], row.get("text_pair"), **options)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": row["label"],
    }


def _encode_generation(row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = prompt + response
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE] * len(prompt) + response,
    }


def render_user_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as a user turn in the chat template, ending where the assistant's reply starts."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "this task renders prompts with a chat template, and the tokenizer has none; "
            "use a chat (instruct) model or a tokenizer with `chat_template` set"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any) -> dict[str, Any]:
    """Token ids of a rendered conversation; labels are -100 except on the assistant turns' tokens.

    Turn by turn: the text the template adds for turn i is ``render(turns[:i+1])`` minus
    ``render(turns[:i])`` (for an assistant turn, minus the generation prompt, so the role header
    is not trained either). Each piece is tokenised without added special tokens; the template
    carries them. A template that does not render a conversation as a growing prefix is refused.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "conversation data needs a tokenizer with a chat template (`tokenizer.chat_template`)"
        )
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            header = tokenizer.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            _extend(ids, labels, _piece(header, rendered, tokenizer), trained=False)
            rendered = header
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        _extend(ids, labels, _piece(full, rendered, tokenizer), trained=turn["role"] == "assistant")
        rendered = full
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _piece(text: str, prefix: str, tokenizer: Any) -> list[int]:
    if not text.startswith(prefix):
        raise ValueError(
            "the chat template does not render a conversation as a growing prefix (a later turn "
            "changes earlier text), so assistant tokens cannot be located; use another template"
        )
    return tokenizer(text[len(prefix) :], add_special_tokens=False)["input_ids"]


def _extend(ids: list[int], labels: list[int], piece: list[int], trained: bool) -> None:
    ids.extend(piece)
    labels.extend(piece if trained else [IGNORE] * len(piece))


class Collator:
    """Pads a list of tokenised examples: sequence labels padded with -100, class labels stacked."""

    def __init__(self, pad_id: int, side: str = "right") -> None:
        self.pad_id, self.side = pad_id, side

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": self._pad([r["input_ids"] for r in rows], width, self.pad_id),
            "attention_mask": self._pad([r["attention_mask"] for r in rows], width, 0),
        }
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            if isinstance(labels[0], list):
                batch["labels"] = self._pad(labels, width, IGNORE)
            else:
                dtype = torch.float32 if isinstance(labels[0], float) else torch.long
                batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch

    def _pad(self, seqs: list[list[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, seq in enumerate(seqs):
            if self.side == "right":
                out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            elif seq:
                out[i, -len(seq) :] = torch.tensor(seq, dtype=torch.long)
        return out


def init_batches(
    dataset: Any,
    collator: Collator,
    batch_size: int,
    seed: int,
    limit: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, torch.Tensor]]:
    """One seeded, shuffled pass in batches of the SVD batch size (at most ``limit`` batches).

    A single pass on purpose: cycling a small dataset would only repeat tokens EVA has already
    counted; when the data ends first, EVA says so (stop reason ``data_exhausted``) and solves
    exactly. shard=(rank, world): this process takes batches rank, rank + world, ... of the same
    order, so the ranks together feed exactly the batches one process would.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    starts = range(0, len(order), batch_size)
    starts = starts if limit is None else starts[:limit]
    rank, world = shard
    for start in starts[rank::world]:
        yield collator([dataset[i] for i in order[start : start + batch_size]])
