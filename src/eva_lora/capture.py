"""Capture the input activations of target layers with forward hooks.

Hooks live in a context manager so that none survives a normal run or an exception. On the first
forward pass, layers whose input is the *same tensor object* (q/k/v, gate/up) are grouped so that
they share one PCA: identity is free to test, and the probe keeps a reference to every input it
has seen during that pass so a freed tensor's id cannot be reused by another one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import EvaConfig
from .pca import CovarianceAccumulator

try:  # transformers' GPT-2 style linear layer stores its weight transposed.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, kept optional here
    Conv1D = ()  # type: ignore[assignment,misc]

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
HEAD_NAMES = ("lm_head", "classifier", "score", "cls")

# select_tokens(layer_input, batch, layer_name) -> (n_tokens, in_features)
TokenSelector = Callable[[torch.Tensor, Any, str], torch.Tensor]


def in_features(module: nn.Module) -> int:
    """Input width of a supported layer (Conv1D keeps its weight as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return int(module.weight.shape[0])


def _matches(name: str, pattern: Sequence[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list matches exact names or suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _default_excluded(model: nn.Module, name: str, module: nn.Module) -> bool:
    """By default the output head is not adapted (PEFT's 'all-linear' does the same)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return module is head or name.split(".")[-1] in HEAD_NAMES


def find_target_layers(model: nn.Module, config: EvaConfig) -> dict[str, nn.Module]:
    """name -> layer for every layer EVA adapts, in ``named_modules`` order.

    Raises when nothing matches or when the selection names a layer type EVA cannot adapt.
    """
    targets: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if config.target_modules is None:
            if isinstance(module, SUPPORTED_LAYERS) and not _default_excluded(model, name, module):
                targets[name] = module
            continue
        if _matches(name, config.target_modules):
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


def _example_linear_names(model: nn.Module, limit: int = 6) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)]
    return names[:limit] or ["<none>"]


def token_mask(batch: Any, config: EvaConfig) -> torch.Tensor | None:
    """(batch, seq) bool mask of tokens that enter the PCA, or None when the batch has no mask."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    mask = mask.bool() if isinstance(mask, torch.Tensor) else None
    labels = batch.get("labels")
    if config.use_label_mask and isinstance(labels, torch.Tensor) and labels.ndim >= 2:
        keep = labels != config.label_mask_value
        mask = keep if mask is None else mask & keep
    return mask


def default_select_tokens(x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None,
                          name: str) -> torch.Tensor:
    """Rows of a layer input that enter the PCA: (..., d) -> (n_tokens, d).

    ``index`` holds the flat positions of the kept tokens, computed once per batch from ``mask``
    so each layer does a cheap ``index_select`` instead of a boolean mask (a nonzero per layer).
    The mask applies when the input's leading shape is (batch, seq) or (batch * seq); any other
    2-D input (a pooler's (batch, d), an RL step's features) is used whole.
    """
    d = x.shape[-1]
    if mask is None or index is None:
        return x.reshape(-1, d)
    if tuple(x.shape[:-1]) == tuple(mask.shape) or (x.ndim == 2 and x.shape[0] == mask.numel()):
        return x.reshape(-1, d).index_select(0, index.to(x.device))
    if x.ndim == 2:
        return x
    raise ValueError(
        f"layer {name}: input shape {tuple(x.shape)} does not line up with the token mask "
        f"{tuple(mask.shape)}; pass select_tokens= to compute_eva_state for this kind of layer"
    )


@dataclass
class LayerGroup:
    """Layers that receive the same input tensor, and the one PCA they share."""

    names: list[str]
    dim: int
    stats: CovarianceAccumulator
    active: bool = True


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: no layer after it still needs data."""


class ActivationCapture:
    """Context manager: hooks on target layers feeding one accumulator per input group.

    Call :meth:`set_batch` before each forward pass. After the first pass, :attr:`groups` is final
    and only one hook per group remains. ``group.active = False`` makes a group's hook a no-op.
    """

    def __init__(self, layers: Mapping[str, nn.Module], config: EvaConfig,
                 select_tokens: TokenSelector | None = None) -> None:
        self.layers = dict(layers)
        self.config = config
        self.select_tokens = select_tokens
        self.stats_dtype = getattr(torch, config.stats_dtype)
        self.groups: list[LayerGroup] = []
        self._group_of: dict[str, LayerGroup] = {}
        self._probe_inputs: dict[int, tuple[torch.Tensor, LayerGroup]] | None = {}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._batch: Any = None
        self._mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._probe_calls: Counter[str] = Counter()
        self.single_call = False  # every target layer ran exactly once in the probe pass
        self._exit_group: LayerGroup | None = None

    def __enter__(self) -> ActivationCapture:
        for name, module in self.layers.items():
            self._handles[name] = module.register_forward_hook(self._make_hook(name), with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._probe_inputs = None

    def set_batch(self, batch: Any) -> None:
        self._batch = batch
        self._mask = token_mask(batch, self.config)
        self._index = None if self._mask is None else self._mask.reshape(-1).nonzero().squeeze(1)

    def finish_probe(self) -> None:
        """Freeze the grouping after the first pass and keep one hook per group."""
        self._probe_inputs = None
        missing = [n for n in self.layers if n not in self._group_of]
        if missing:
            raise RuntimeError(
                "these target layers were not called during the forward pass, so EVA cannot see "
                f"their inputs: {missing[:10]}; exclude them with exclude_modules"
            )
        self._keep_leader_hooks()
        self.single_call = all(count == 1 for count in self._probe_calls.values())

    def _keep_leader_hooks(self) -> None:
        """One hook per group: the followers' inputs are the leader's tensor."""
        for group in self.groups:
            for follower in group.names[1:]:
                self._handles.pop(follower).remove()

    def restore_groups(self, groups: list[list[str]], stats: list[CovarianceAccumulator], single_call: bool) -> None:
        """Recreate the groups of a checkpoint instead of probing (their statistics continue as saved)."""
        missing = [n for names in groups for n in names if n not in self.layers]
        if missing or sorted(n for names in groups for n in names) != sorted(self.layers):
            raise ValueError("the checkpoint was made for other target layers "
                             f"(not in this model / targets: {missing[:5]})")
        self._probe_inputs = None
        for names, acc in zip(groups, stats):
            group = LayerGroup(list(names), acc.dim, acc)
            self.groups.append(group)
            for name in names:
                self._group_of[name] = group
        self._keep_leader_hooks()
        self.single_call = single_call

    def set_exit_point(self, enabled: bool) -> None:
        """Stop later forward passes after the last active group (in execution order).

        Only safe when every target layer runs once per pass: a layer called twice (shared
        weights) could be cut off before its second call.
        """
        active = [g for g in self.groups if g.active]
        self._exit_group = active[-1] if enabled and self.single_call and active else None

    @property
    def exit_layer(self) -> str | None:
        """The layer after which forward passes now stop (None: they run to the end)."""
        return None if self._exit_group is None else self._exit_group.names[0]

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = _first_tensor(args, kwargs, name)
            group = self._group_of.get(name)
            if self._probe_inputs is not None:
                self._probe_calls[name] += 1
            if group is None:
                group = self._assign_group(name, x)
                if group.names[0] != name:
                    return  # a follower: its leader already counted this tensor
            if group.active:
                self._accumulate(group, name, x)
                if group is self._exit_group:
                    raise StopForward

        return hook

    def _assign_group(self, name: str, x: torch.Tensor) -> LayerGroup:
        if self._probe_inputs is None:
            raise RuntimeError(f"layer {name} was first called after the probe pass")
        seen = self._probe_inputs.get(id(x))
        if seen is not None and seen[0] is x and seen[1].dim == x.shape[-1]:
            group = seen[1]
            group.names.append(name)
        else:
            dim = int(x.shape[-1])
            group = LayerGroup([name], dim, CovarianceAccumulator(dim, x.device, self.stats_dtype))
            self.groups.append(group)
            self._probe_inputs[id(x)] = (x, group)
        self._group_of[name] = group
        return group

    def _accumulate(self, group: LayerGroup, name: str, x: torch.Tensor) -> None:
        if self.select_tokens is not None:
            rows = self.select_tokens(x, self._batch, name)
        else:
            rows = default_select_tokens(x, self._mask, self._index, name)
        if rows.ndim != 2 or rows.shape[-1] != group.dim:
            raise ValueError(f"layer {name}: token selection returned shape {tuple(rows.shape)}, "
                             f"expected (n_tokens, {group.dim})")
        group.stats.update(rows.detach())


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"layer {name} was called without a tensor input")


def collect_statistics(model: nn.Module, batches: Iterable[Any], config: EvaConfig) -> list[LayerGroup]:
    """Accumulate every target group's statistics over all ``batches``, with no convergence test.

    The exact reference for a run (use ``stats_dtype="float64"``), and the way to get covariances
    for analysis. Batches are fed as ``model(**batch)`` and must already be on the model's device.
    """
    layers = find_target_layers(model, config)
    with torch.no_grad(), ActivationCapture(layers, config) as capture:
        for index, batch in enumerate(batches):
            capture.set_batch(batch)
            model(**batch)
            if index == 0:
                capture.finish_probe()
    if not capture.groups:
        raise ValueError("batches is empty")
    return capture.groups
