"""Glue for training stacks that own the data pipeline (transformers' Trainer, TRL's SFTTrainer).

EVA must see the batches training will see: the same dataset, collator, sampler and, above all,
the same label masks: TRL's completion-only or assistant-only loss sets ``labels = -100`` on every
token it does not train, and with ``use_label_mask`` exactly the trained tokens enter the PCA.
``trainer_batches`` reads the batches from the trainer itself.

Order matters: compute EVA *after* building the trainer and *before* ``trainer.train()``. The
trainer builds its optimiser and LR scheduler inside ``train()``; EVA may re-create LoRA modules
whose rank changed (PEFT's ``update_layer``), so an optimiser built earlier would hold parameters
the model no longer uses, and a scheduler stepped during EVA would start training mid-warm-up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "labels",
    "position_ids",
    "token_type_ids",
    "pixel_values",
)


def trainer_batches(trainer: Any, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """The trainer's own training batches (its collator and sampler, sharded per rank under DDP /
    accelerate), restricted to model inputs and labels, at most ``max_batches`` of them."""
    loader = trainer.get_train_dataloader()
    stream = (b for b in loader)
    for batch in itertools.islice(stream, max_batches) if max_batches else stream:
        yield {k: v for k, v in batch.items() if k in MODEL_INPUTS}
