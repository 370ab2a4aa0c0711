"""Parts of the EVA loop that are not numerics: the bounded batch stream, devices, progress."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


class _BadBatches(Exception):
    """Carries an error about the batches argument out of the generator, apart from user errors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def bounded_stream(batches: Iterable[Any], limit: int) -> Iterator[tuple[int, Any]]:
    """Yield (epoch, batch) at most ``limit`` times: re-iterables cycled, iterators read once."""
    if isinstance(batches, (Mapping, torch.Tensor)):
        raise TypeError(
            "batches must be an iterable of batches (e.g. a list of dicts or a "
            f"DataLoader), not a single {type(batches).__name__}"
        )
    return _stream(batches, limit)


def _stream(batches: Iterable[Any], limit: int) -> Iterator[tuple[int, Any]]:
    one_shot = iter(batches) is batches
    produced, epoch = 0, 0
    while produced < limit:
        empty = True
        for batch in batches:
            empty = False
            yield epoch, batch
            produced += 1
            if produced >= limit:
                return
        if empty and produced == 0:
            raise _BadBatches(ValueError("batches is empty: EVA needs at least one batch"))
        if one_shot or empty:
            return
        epoch += 1


def next_batch(stream: Iterator[tuple[int, Any]], done: int) -> tuple[int, Any] | None:
    """The next batch, or None at the end; an error in the user's data pipeline is named as such."""
    try:
        return next(stream, None)
    except _BadBatches as err:  # our own complaint about the iterable itself
        raise err.error from None
    except Exception as err:
        raise RuntimeError(
            f"the batches iterable raised while producing batch {done + 1}: {err!r}"
        ) from err


def model_device(model: nn.Module) -> torch.device | None:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# Layers that rewrite their weights when they run in eval mode: bitsandbytes' Linear4bit on a CPU
# with AVX512-BF16 repacks its weight for an inference kernel that has no backward, so a LoRA
# trained on it afterwards gets no gradient through the base layers (torch only warns). EVA runs
# them in train mode, which changes nothing else in them (they have no dropout).
REPACK_IN_EVAL = ("Linear4bit", "LinearNF4", "LinearFP4")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the EVA passes (no dropout), restored afterwards, except
    :data:`REPACK_IN_EVAL`."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        if type(module).__name__ in REPACK_IN_EVAL:
            module.training = True
    try:
        yield
    finally:
        model.train(was_training)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for dist in ("eva-lora", "transformers", "peft", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


class EvaProgress:
    """What the user waits for: converged / needed components, batches and tokens, the stop rule.

    The bar counts components (the loop ends when every needed one has converged), not batches: a
    run that converges after 41 of at most 1000 batches ends at 100 %, not at 4 %.
    """

    def __init__(self, enabled: bool, max_batches: int) -> None:
        self.enabled, self.max_batches = enabled, max_batches
        self.bar: Any = None

    def update(self, entry: dict[str, Any], n_groups: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=entry["needed_components"],
                desc="EVA: components converged",
                leave=False,
                dynamic_ncols=True,
                bar_format="{desc} {n}/{total} |{bar}| {postfix}",
            )
        self.bar.total = entry["needed_components"]
        self.bar.n = entry["converged_components"]
        self.bar.set_postfix_str(
            f"batch {entry['batch']} (stops at {self.max_batches} at most), "
            f"{entry['tokens']} tokens, {entry['active_groups']}/{n_groups} groups active"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
