"""Which modules EVA adapts, their input / output widths, and how their input becomes PCA rows.

The one place that knows every supported layer type and its shapes, so that capture, the state file,
the PEFT bridge and the planners agree. A linear layer's rows are its input vectors; a ``Conv2d``'s
are its input *patches* (``unfold`` with the layer's kernel, stride, padding and dilation), because
that is the space PEFT's LoRA ``A`` for a convolution lives in: a ``(r, C_in, kh, kw)`` kernel is r
rows of length ``C_in * kh * kw``. (PEFT's ``A`` convolves every input channel, also for a grouped
or depthwise base layer, so the patches span every channel too.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers' GPT-2 style linear layer stores its weight transposed.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is optional for the core
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
SUPPORTED_LAYERS: tuple[type, ...] = LINEAR_LAYERS + (nn.Conv2d,)
HEAD_NAMES = ("lm_head", "classifier", "score", "cls")
# PEFT's shorthand, and the paper's LM recipe
ALL_LINEAR, ALL_LINEAR_AND_HEAD = "all-linear", "all-linear-and-head"


def in_features(module: nn.Module) -> int:
    """Width of a supported layer's PCA rows: input features, or ``C_in * kh * kw`` for a Conv2d."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw
    return int(module.weight.shape[0])  # Conv1D keeps its weight as (in, out)


def out_features(module: nn.Module) -> int:
    """Output width of a supported layer (output channels for a Conv2d)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return int(module.weight.shape[1])


def row_kind(module: nn.Module) -> tuple:
    """What makes two layers' rows the same for the same input tensor (layers fed one tensor share a
    PCA only when their rows are built alike: same width, and for convolutions the same patches)."""
    if isinstance(module, nn.Conv2d):
        return (
            "conv2d",
            in_features(module),
            module.kernel_size,
            module.stride,
            _padding(module),
            module.dilation,
        )
    return ("linear", in_features(module))


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) input -> (N * L, C * kh * kw) patches: the windows the convolution reads."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if (
        module.kernel_size == (1, 1)
        and _padding(module) in ((0, 0), "valid")
        and module.dilation == (1, 1)
    ):
        # a pointwise convolution reads one pixel per window: no unfold (im2col) copy needed
        x = x[:, :, :: module.stride[0], :: module.stride[1]]
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    padding = _padding(module)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    cols = F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _padding(module: nn.Conv2d) -> Any:
    return module.padding if isinstance(module.padding, str) else tuple(module.padding)


def matches(name: str, pattern: Sequence[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list, exact names or suffixes."""
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
    ``"all-linear"``); ``"all-linear-and-head"`` adds the head (the paper's language-generation
    recipe). Convolutions are adapted when ``target_modules`` names them.
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
            if isinstance(module, LINEAR_LAYERS) and (
                head_ok or not _default_excluded(model, name, module)
            ):
                targets[name] = module
            continue
        if matches(name, config.target_modules):
            if isinstance(module, SUPPORTED_LAYERS):
                targets[name] = module
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TypeError(
            "target_modules matched layers EVA cannot adapt (nn.Linear, transformers' Conv1D, "
            "nn.Conv2d): " + ", ".join(unsupported[:10])
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
