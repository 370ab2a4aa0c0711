"""Capture the input rows of target layers with forward *pre*-hooks.

Hooks live in a context manager so that none survives a normal run or an exception. A first
*probe* pass groups layers whose input is the *same tensor object* (q/k/v, gate/up) so that they
share one PCA: identity is free to test, and the probe keeps a reference to every input it has
seen during that pass so a freed tensor's id cannot be reused by another one. The engine runs the
probe on a slice of the first batch (one sequence of a few tokens, :func:`probe_slice`), so those
references cost nothing, and it learns the order in which the layers run.

After the probe each group's rows go to its ``sink`` (a statistic's ``update``, or a collective that
sends them to the owner process) inside the hook, so at most one layer's input is alive at a time;
a group with ``active = False`` costs nothing. The hooks run *before* their layer: the deepest group
that still needs data raises :class:`StopForward` before its layer computes anything, so a pass
never builds what EVA does not read (an LM head's logits, a loss).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .targets import conv_patches, find_target_layers, row_kind

# select_tokens(layer_input, batch, layer_name) -> (n_tokens, in_features)
TokenSelector = Callable[[torch.Tensor, Any, str], torch.Tensor]
RowSink = Callable[[torch.Tensor], None]


PROBE_TOKENS = 16  # tokens of the one sequence the probe pass runs
COUNT_KEYS = ("batches", "tokens", "kept", "label_masked_batches", "empty_batches")


def token_mask(
    batch: Any, use_label_mask: bool = True, label_mask_value: int = -100
) -> torch.Tensor | None:
    """(batch, seq) bool mask of tokens that enter the PCA, or None when the batch has no mask.

    An ``attention_mask`` or ``labels`` whose shape is not the ``input_ids``' is an error: ignored,
    it would let padding (or untrained tokens) into the PCA without a word."""
    if not isinstance(batch, Mapping):
        return None
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    token_labels = (
        labels if use_label_mask and isinstance(labels, torch.Tensor) and labels.ndim >= 2 else None
    )
    # (batch,) labels are classes
    for key, value in (("attention_mask", mask), ("labels", token_labels)):
        if (
            isinstance(ids, torch.Tensor)
            and isinstance(value, torch.Tensor)
            and value.shape != ids.shape
        ):
            raise ValueError(
                f"the batch's {key} has shape {tuple(value.shape)} but its input_ids have shape "
                f"{tuple(ids.shape)}: they must match token for token"
            )
    mask = mask.bool() if isinstance(mask, torch.Tensor) else None
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.ndim >= 2:
        keep = labels != label_mask_value
        mask = keep if mask is None else mask & keep
    return mask


def probe_slice(batch: Any) -> Any:
    """A small copy of a token batch for the probe pass: its first sequence, first few tokens.

    Tensors shaped like ``input_ids`` (masks, labels, position ids) are cut the same way, other
    tensors with the batch's leading size keep their first row. None when the batch is not a
    mapping with 2-D ``input_ids`` (images, RL windows: the probe then runs on the whole batch)."""
    if not isinstance(batch, Mapping):
        return None
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        return None
    rows, length = ids.shape
    if rows == 1 and length <= PROBE_TOKENS:
        return None  # already small
    out = {}
    for key, value in batch.items():
        if (
            isinstance(value, torch.Tensor)
            and value.ndim >= 2
            and tuple(value.shape[:2]) == (rows, length)
        ):
            out[key] = value[:1, :PROBE_TOKENS]
        elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
            out[key] = value[:1]
        else:
            out[key] = value
    return out


def default_select_tokens(
    x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None, name: str
) -> torch.Tensor:
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
    """Layers that take the same input tensor (and build the same rows from it); where rows go."""

    names: list[str]
    dim: int
    device: torch.device
    sink: RowSink | None = None  # None: this process does not keep this group's rows
    active: bool = True
    kind: tuple = ()  # targets.row_kind of its layers


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: no layer after it still needs data."""


class ActivationCapture:
    """Context manager: hooks on target layers, one sink per input group.

    Call :meth:`set_batch` before each forward pass. The first pass is the probe (groups form,
    nothing is kept); :meth:`finish_probe` freezes the groups and keeps one hook per group.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        use_label_mask: bool = True,
        label_mask_value: int = -100,
        select_tokens: TokenSelector | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.use_label_mask, self.label_mask_value = use_label_mask, label_mask_value
        self.select_tokens = select_tokens
        self.groups: list[LayerGroup] = []
        self._group_of: dict[str, LayerGroup] = {}
        self._probe_inputs: dict[tuple, tuple[torch.Tensor, LayerGroup]] | None = {}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._batch: Any = None
        self._mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        self._probe_calls: Counter[str] = Counter()
        self.single_call = False  # every target layer ran exactly once in the probe pass
        self._exit_group: LayerGroup | None = None
        # tokens the batches held (attention mask) and kept (attention
        # and label masks): diagnostics.py. Summed as a host tensor, read
        # once at the end (:attr:`counts`): a batch costs no host read.
        self._counts = torch.zeros(len(COUNT_KEYS), dtype=torch.int64)
        self._counts_override: dict[str, int] | None = None

    @property
    def probing(self) -> bool:
        return self._probe_inputs is not None

    def __enter__(self) -> ActivationCapture:
        for name, module in self.layers.items():
            self._handles[name] = module.register_forward_pre_hook(
                self._make_hook(name), with_kwargs=True
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._probe_inputs = None

    def set_batch(self, batch: Any, host_batch: Any = None, count: bool = False) -> None:
        """The batch the next pass runs: its token mask becomes one index of the kept tokens, once.

        ``host_batch`` is the same batch before it was moved to the model's device (as a data loader
        yields it): the index is computed there (``nonzero``, one read of host memory) and sent over
        without waiting, so the device is never asked for a value. Without it, the one ``nonzero``
        per batch runs where the batch is, whatever the number of layers."""
        self._batch = batch
        source = batch if host_batch is None else host_batch
        self._mask = token_mask(source, self.use_label_mask, self.label_mask_value)
        self._index = None if self._mask is None else self._mask.reshape(-1).nonzero().squeeze(1)
        if count:
            self._count(source)
        if self._index is not None and self._index.numel() == self._mask.numel():
            # nothing to drop: layers hand over a view of their input
            self._mask = self._index = None
        device = _first_device(batch)
        if self._index is not None and device is not None:
            self._index = self._index.to(device, non_blocking=True)

    def _count(self, source: Any) -> None:
        """Add this batch's token counts (host memory only: a count never waits for a device)."""
        if not isinstance(source, Mapping) or not isinstance(source.get("input_ids"), torch.Tensor):
            return
        ids, attention = source["input_ids"], source.get("attention_mask")
        if ids.device.type != "cpu":
            return
        total = (
            attention.sum().to(torch.int64)
            if isinstance(attention, torch.Tensor)
            else torch.tensor(ids.numel())
        )
        kept = torch.tensor(self._index.numel()) if self._index is not None else total
        labels = source.get("labels")
        labelled = self.use_label_mask and isinstance(labels, torch.Tensor) and labels.ndim >= 2
        self._counts += torch.stack(
            [torch.tensor(1), total, kept, torch.tensor(int(labelled)), (kept == 0).to(torch.int64)]
        )

    @property
    def counts(self) -> dict[str, int]:
        """Token counts of the batches fed so far (one read of a host tensor)."""
        if self._counts_override is not None:
            return dict(self._counts_override)
        return dict(zip(COUNT_KEYS, self._counts.tolist()))

    @counts.setter
    def counts(self, value: dict[str, int]) -> None:
        self._counts_override = dict(value)

    def missing_layers(self) -> list[str]:
        """Target layers the probe has not seen called (yet)."""
        return [n for n in self.layers if n not in self._group_of]

    def finish_probe(self) -> None:
        """Freeze the grouping after the first pass and keep one hook per group."""
        self._probe_inputs = None
        missing = self.missing_layers()
        if missing:
            raise RuntimeError(
                "these target layers were not called during the forward pass, so EVA cannot see "
                f"their inputs: {missing[:10]}; exclude them with exclude_modules. (A model or "
                "block compiled with torch.compile skips hooks added after compilation: pass the "
                "uncompiled module.)"
            )
        self._keep_leader_hooks()
        self.single_call = all(count == 1 for count in self._probe_calls.values())

    def _keep_leader_hooks(self) -> None:
        """One hook per group: the followers' inputs are the leader's tensor."""
        for group in self.groups:
            for follower in group.names[1:]:
                self._handles.pop(follower).remove()

    def restore_groups(
        self, groups: list[tuple[list[str], int]], device: torch.device, single_call: bool
    ) -> None:
        """Recreate the groups of a checkpoint, as (names, dim), instead of probing."""
        missing = [n for names, _ in groups for n in names if n not in self.layers]
        if missing or sorted(n for names, _ in groups for n in names) != sorted(self.layers):
            raise ValueError(
                "the checkpoint was made for other target layers "
                f"(not in this model / targets: {missing[:5]})"
            )
        self._probe_inputs = None
        for names, dim in groups:
            group = LayerGroup(list(names), dim, device, kind=row_kind(self.layers[names[0]]))
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

    def restart_probe(self) -> None:
        """Forget a probe that saw too little (a slice that missed some layers): probe again."""
        self.groups, self._group_of, self._probe_inputs = [], {}, {}
        self._probe_calls.clear()

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _first_tensor(args, kwargs, name)
            if self._probe_inputs is not None:
                self._probe_calls[name] += 1
                if name not in self._group_of:
                    self._assign_group(name, x)
                return
            group = self._group_of[name]
            if group.active:
                if group.sink is not None:
                    group.sink(self._rows(group, name, x))
                if group is self._exit_group:
                    raise StopForward

        return hook

    def _assign_group(self, name: str, x: torch.Tensor) -> LayerGroup:
        kind = row_kind(self.layers[name])
        seen = self._probe_inputs.get((id(x), kind))
        if seen is not None and seen[0] is x:
            group = seen[1]
            group.names.append(name)
        else:
            group = LayerGroup([name], kind[1], x.device, kind=kind)
            self.groups.append(group)
            self._probe_inputs[(id(x), kind)] = (x, group)
        self._group_of[name] = group
        return group

    def _rows(self, group: LayerGroup, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.select_tokens is not None:
            rows = self.select_tokens(x, self._batch, name)
        elif group.kind[0] == "conv2d":
            rows = conv_patches(self.layers[name], x)  # images: every patch (no token mask applies)
        else:
            rows = default_select_tokens(x, self._mask, self._index, name)
        if rows.ndim != 2 or rows.shape[-1] != group.dim:
            raise ValueError(
                f"layer {name}: token selection returned shape {tuple(rows.shape)}, "
                f"expected (n_tokens, {group.dim})"
            )
        return rows.detach()


def _first_device(batch: Any) -> torch.device | None:
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value.device
    return None


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"layer {name} was called without a tensor input")


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """The module to run for capture, with ``torch.compile`` out of the way.

    A model wrapped by ``torch.compile(model)`` ignores forward hooks registered after compilation,
    so the statistics would silently see nothing: its original module (same parameters) runs
    instead. Modules compiled in place (``module.compile()``) run their eager forward while the
    context is open. A compiled *submodule* (``block = torch.compile(block)``) cannot be unwrapped
    without changing module names, so it is refused with a clear error.
    """
    root = getattr(model, "_orig_mod", None) if _is_compiled_wrapper(model) else model
    nested = [n for n, m in root.named_modules() if n and _is_compiled_wrapper(m)]
    if nested:
        raise TypeError(
            f"submodules compiled with torch.compile ({nested[:3]}) would skip EVA's hooks; "
            "compute the EVA state on the uncompiled model and compile afterwards"
        )
    compiled = [m for m in root.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    saved = [m._compiled_call_impl for m in compiled]
    try:
        for module in compiled:
            module._compiled_call_impl = None
        yield root
    finally:
        for module, impl in zip(compiled, saved):
            module._compiled_call_impl = impl


def _is_compiled_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


@dataclass
class CollectedGroup:
    names: list[str]
    stats: Any  # an ExactStatistic


def collect_statistics(
    model: nn.Module, batches: Iterable[Any], config: Any, dtype: torch.dtype = torch.float64
) -> list[CollectedGroup]:
    """Exact statistics of every target group over all ``batches``, with no convergence test.

    The float64 reference for tests and benchmarks (``torch.linalg.eigh`` of the exact covariance
    of the same tokens), and the way to get covariances for analysis. Batches are fed as
    ``model(**batch)`` and must already be on the model's device.
    """
    from .statistics import ExactStatistic

    layers = find_target_layers(model, config)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    capture = ActivationCapture(layers, config.use_label_mask, config.label_mask_value)
    with torch.no_grad(), capture:
        capture.set_batch(batches[0])
        model(**batches[0])
        capture.finish_probe()
        out = []
        for group in capture.groups:
            stats = ExactStatistic(group.dim, group.device, dtype)
            group.sink = stats.update
            out.append(CollectedGroup(group.names, stats))
        for batch in batches:
            capture.set_batch(batch)
            model(**batch)
    return out
