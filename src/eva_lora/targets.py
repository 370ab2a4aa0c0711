"""Which modules EVA adapts, and their input / output widths, with PEFT's matching rules.

The one place that knows every supported layer type and its shapes, so that capture, the state file,
the PEFT bridge and the planners agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

try:  # transformers' GPT-2 style linear layer stores its weight transposed.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the core
    Conv1D = ()  # type: ignore[assignment,misc]

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
HEAD_NAMES = ("lm_head", "classifier", "score", "cls")
ALL_LINEAR, ALL_LINEAR_AND_HEAD = "all-linear", "all-linear-and-head"  # PEFT's shorthand, and the paper's LM recipe


def in_features(module: nn.Module) -> int:
    """Input width of a supported layer (Conv1D keeps its weight as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return int(module.weight.shape[0])


def out_features(module: nn.Module) -> int:
    """Output width of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.weight.shape[1])


def matches(name: str, pattern: Sequence[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list matches exact names or suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _default_excluded(model: nn.Module, name: str, module: nn.Module) -> bool:
    """By default the output head is not adapted (PEFT's 'all-linear' does the same)."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):  # some models declare the method but have no head
        head = None
    return module is head or name.split(".")[-1] in HEAD_NAMES


def find_target_layers(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """name -> layer for every layer EVA adapts, in ``named_modules`` order.

    ``config`` needs ``target_modules`` and ``exclude_modules`` (an :class:`~eva_lora.EvaConfig`).
    ``None`` or ``"all-linear"`` selects every linear layer but the output head (as PEFT's
    ``"all-linear"``); ``"all-linear-and-head"`` adds the head (the paper's language-generation recipe).
    Raises when nothing matches or when the selection names a layer type EVA cannot adapt.
    """
    targets: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    selection = config.target_modules
    for name, module in model.named_modules():
        if not name:
            continue
        if config.exclude_modules is not None and matches(name, config.exclude_modules):
            continue
        if selection in (None, ALL_LINEAR, ALL_LINEAR_AND_HEAD):
            head_ok = selection == ALL_LINEAR_AND_HEAD
            if isinstance(module, SUPPORTED_LAYERS) and (head_ok or not _default_excluded(model, name, module)):
                targets[name] = module
            continue
        if matches(name, config.target_modules):
            if isinstance(module, SUPPORTED_LAYERS):
                targets[name] = module
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TypeError(
            "target_modules matched layers EVA cannot adapt (only nn.Linear and transformers' Conv1D): "
            + ", ".join(unsupported[:10])
        )
    if not targets:
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r} "
            f"(exclude_modules={config.exclude_modules!r}); linear layers in this model look like: "
            + ", ".join(_example_linear_names(model))
        )
    return targets


def layer_shapes(layers: dict[str, nn.Module]) -> dict[str, list[int]]:
    """name -> [in_features, out_features] (what an EVA state records to check a model against)."""
    return {name: [in_features(m), out_features(m)] for name, m in layers.items()}


def _example_linear_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)]
    return names[:limit] or ["<none>"]
