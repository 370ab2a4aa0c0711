"""compute_eva_state: feed batches, accumulate statistics, check convergence, allocate ranks.

The loop is bounded by ``max_batches`` and always records why it stopped.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate_ranks, rank_scores
from .capture import ActivationCapture, StopForward, TokenSelector, find_target_layers, in_features
from .checkpoint import load_checkpoint, restore_loop, save_loop
from .config import EvaConfig
from .convergence import ComponentTracker
from .distributed import Communicator
from .pca import CovarianceAccumulator
from .state import EvaState

ForwardFn = Callable[[nn.Module, Any], Any]


class EvaNotConvergedError(RuntimeError):
    """Raised with ``strict=True`` when the loop ends before every needed component converged."""


def compute_eva_state(
    model: nn.Module,
    batches: Iterable[Any],
    config: EvaConfig | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    select_tokens: TokenSelector | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> EvaState:
    """Compute EVA components and ranks for ``model`` from ``batches``.

    batches: any iterable; dict batches are fed as ``model(**batch)`` (tensors moved to the
    model's device), anything else as ``model(batch)`` unless ``forward_fn(model, batch)`` is given.
    A re-iterable (list, DataLoader) is cycled until convergence; an iterator is consumed once.
    select_tokens(layer_input, batch, layer_name) -> (n_tokens, in_features) replaces the default
    masking for inputs that are not (batch, seq, dim) / (n, dim).
    The model is left exactly as it was: no hook survives, train/eval mode is restored.
    checkpoint_dir / checkpoint_every: save the statistics and solver state atomically every N
    batches; resume=True continues from the last checkpoint there (the batches must be the same
    sequence: the ones before the checkpoint are skipped, not fed) and gives the same result as an
    uninterrupted run. Without a checkpoint yet, resume starts from the first batch.
    """
    config = config or EvaConfig()
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every / resume need checkpoint_dir")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    layers = find_target_layers(model, config)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ActivationCapture(layers, config, select_tokens) as capture:
            loop = _EvaLoop(model, capture, config, forward_fn)
            loop.checkpointing(checkpoint_dir, checkpoint_every, resume)
            loop.run(batches)
    finally:
        model.train(was_training)
    return loop.build_state(layers)


class _EvaLoop:
    """The state of one run: groups, trackers, history and the reason it stopped."""

    def __init__(self, model: nn.Module, capture: ActivationCapture, config: EvaConfig,
                 forward_fn: ForwardFn | None) -> None:
        self.model, self.capture, self.config = model, capture, config
        self.forward_fn = forward_fn or _default_forward
        self.device = _model_device(model)
        self.trackers: list[ComponentTracker] = []
        self.caps: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.comm = Communicator(config.distributed_inputs, self.device)
        self.totals: list[CovarianceAccumulator] = []  # all ranks' statistics (sharded mode only)
        self.steps = 0  # batches this process fed (or skipped on resume)
        self.checkpoint_dir: Path | None = None
        self.checkpoint_every = 0
        self.resumed: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None  # the checkpoint resumed
        self.n_batches = 0  # batches of all processes (= steps for one process)
        self.stop_reason = "max_batches"
        self.started = time.perf_counter()

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpointing(self, directory: Any, every: int, resume: bool) -> None:
        self.checkpoint_dir = None if directory is None else Path(directory)
        self.checkpoint_every = every
        if (every or resume) and self.comm.active:
            raise ValueError("checkpoints are single-process for now: under torch.distributed, leave "
                             "checkpoint_every at 0 and resume unset")
        if resume:
            self.resumed = load_checkpoint(self.checkpoint_dir)
            if self.resumed is None:
                warnings.warn(f"no EVA checkpoint in {self.checkpoint_dir}: starting from the first batch",
                              RuntimeWarning, stacklevel=3)
            else:
                meta = self.resumed[0]
                mine = {k: v for k, v in self.config.to_dict().items() if k != "progress"}
                theirs = {k: v for k, v in meta["config"].items() if k != "progress"}
                if mine != theirs:
                    changed = sorted(k for k in mine if mine.get(k) != theirs.get(k))
                    raise ValueError(f"the checkpoint in {self.checkpoint_dir} was made with other settings: {changed}")
                self.steps, self.n_batches = int(meta["steps"]), int(meta["n_batches"])
                restore_loop(self, *self.resumed)

    # ---- the loop ------------------------------------------------------------------------
    def run(self, batches: Iterable[Any]) -> None:
        """Forward, accumulate, check; every rank takes the same decisions from the same reduced numbers."""
        bar = tqdm(total=self.config.max_batches, desc="EVA", unit="batch",
                   disable=not self.config.progress or self.comm.rank != 0, leave=False)
        stream = _bounded_stream(batches, self.config.max_batches)
        for index in range(self.steps):  # resume: skip what the checkpoint already holds
            if _next_batch(stream, index) is None:
                raise ValueError(f"the batches ended after {index} of the {self.steps} batches the checkpoint "
                                 "covers: resume needs the same batches in the same order")
        bar.update(self.steps)
        try:
            while True:
                item = _next_batch(stream, self.steps)
                if not self.comm.all_have_batch(item is not None):
                    self.stop_reason = "max_batches" if self.n_batches >= self.config.max_batches else "data_exhausted"
                    break
                epoch, batch = item
                if epoch > 0 and self.n_batches and self._tokens() == 0:
                    raise ValueError("no valid token in a full pass over the batches: every token is masked "
                                     "(attention_mask / labels == label_mask_value)")
                self._forward(batch)
                bar.update(1)
                if self.steps % self.config.check_every == 0 and self._check():
                    break
                if self.checkpoint_every and self.steps % self.checkpoint_every == 0:
                    save_loop(self.checkpoint_dir, self)
                if self.n_batches >= self.config.max_batches:
                    self.stop_reason = "max_batches"
                    break
                bar.set_postfix_str(self._progress_text())
        finally:
            bar.close()
        if self._tokens() == 0:
            raise ValueError("no valid token reached the target layers: every token is masked or batches are empty")

    def _forward(self, batch: Any) -> None:
        batch = _to_device(batch, self.device)
        self.capture.set_batch(batch)
        try:
            self.forward_fn(self.model, batch)
        except StopForward:
            pass
        except Exception as err:
            raise RuntimeError(f"the model's forward pass failed on batch {self.steps + 1}: {err}") from err
        self.steps += 1
        if not self.trackers:  # the probe pass: groups are known now
            self.capture.finish_probe()
            self.comm.resolve_mode(batch)
            self.comm.check_same_groups([g.names for g in self.capture.groups])
            self._setup_groups()
        self.n_batches += self.comm.size if self.comm.sums_statistics else 1

    def _setup_groups(self) -> None:
        """Per-layer caps: round(rank * rho), never above the layer's input width. Across ranks that
        sum their statistics, every rank adopts rank 0's shift and keeps a running total."""
        for group in self.capture.groups:
            cap = min(self.config.max_components, group.dim)
            for name in group.names:
                self.caps[name] = cap
            self.trackers.append(ComponentTracker(cap, group.dim, self.config.seed))
            if self.comm.sums_statistics:
                self.comm.share_shift(group.stats)
                total = CovarianceAccumulator(group.dim, group.stats.device, group.stats.moment.dtype)
                total.recenter(group.stats.shift)
                self.totals.append(total)

    def _stats(self, index: int) -> CovarianceAccumulator:
        """The statistics of every token seen so far by all ranks (the local ones for one process)."""
        return self.totals[index] if self.totals else self.capture.groups[index].stats

    # ---- convergence ---------------------------------------------------------------------
    def _check(self) -> bool:
        """Solve active groups, re-allocate ranks, (de)activate groups. True when the loop may stop."""
        for index, (group, tracker) in enumerate(zip(self.capture.groups, self.trackers)):
            if not group.active:
                continue
            if self.comm.sums_statistics:
                self.comm.reduce_into(group.stats, self.totals[index])
            _require_finite(group.names, self._stats(index))
            if self.comm.owns(index):
                tracker.check(self._stats(index), self.config.tau)
        if self.comm.active:
            self._share_solutions()
        self.ranks = self._allocate(lambda tracker: tracker.values)
        needed = converged = 0
        for group, tracker in zip(self.capture.groups, self.trackers):
            need = max(self.ranks[n] for n in group.names)
            done = int(tracker.converged[:need].sum())
            group.active = done < need
            needed, converged = needed + need, converged + done
        self.capture.set_exit_point(self.config.early_exit)
        self.history.append({"batch": self.n_batches, "tokens": self._tokens(), "needed_components": needed,
                             "converged_components": converged,
                             "active_groups": sum(g.active for g in self.capture.groups),
                             "forward_ends_after": self.capture.exit_layer,
                             "bytes_communicated": self.comm.bytes_reduced,
                             "seconds": round(time.perf_counter() - self.started, 4)})
        if converged == needed:
            self.stop_reason = "converged"
            return True
        if self.config.delta < 1.0 and converged >= self.config.delta * needed:
            self.stop_reason = "delta"
            return True
        return False

    def _share_solutions(self) -> None:
        """Owners pack (solved?, values, converged, total variance) per group; one all-reduce shares them."""
        width = 2 * max((t.k for t in self.trackers), default=0) + 2
        packed = torch.zeros(len(self.trackers), width, dtype=torch.float64)
        for index, tracker in enumerate(self.trackers):
            if self.comm.owns(index) and tracker.values is not None:
                k = tracker.k
                packed[index, 0] = 1.0
                packed[index, 1 : k + 1] = tracker.values.cpu()
                packed[index, k + 1 : 2 * k + 1] = tracker.converged.to(torch.float64)
                packed[index, -1] = tracker.total_variance
        packed = self.comm.share_solutions(packed)
        for index, tracker in enumerate(self.trackers):
            if packed[index, 0] == 1.0 and not self.comm.owns(index):
                k = tracker.k
                tracker.values = packed[index, 1 : k + 1].clone()
                tracker.converged = packed[index, k + 1 : 2 * k + 1] > 0.5
                tracker.total_variance = float(packed[index, -1])

    def _allocate(self, values_of: Callable[[ComponentTracker], torch.Tensor | None]) -> dict[str, int]:
        """Ranks from the current spectra; a group without an estimate yet keeps its full cap."""
        scores: dict[str, torch.Tensor] = {}
        for group, tracker in zip(self.capture.groups, self.trackers):
            values = values_of(tracker)
            if values is None:
                score = torch.full((tracker.k,), float("inf"), dtype=torch.float64)
            else:
                score = rank_scores(values.cpu(), tracker.total_variance, self.config.rank_metric)
            for name in group.names:
                scores[name] = score
        order = [n for n in self.capture.layers if n in scores]
        budget = self.config.rank * len(order)
        return allocate_ranks({n: scores[n] for n in order}, budget, self.caps, self.config.min_rank)

    # ---- result --------------------------------------------------------------------------
    def build_state(self, layers: Mapping[str, nn.Module]) -> EvaState:
        comps, values, ratios = [], [], []
        for index, (group, tracker) in enumerate(zip(self.capture.groups, self.trackers)):
            stats = self._stats(index)
            if stats.count < 2:
                raise ValueError(f"layer(s) {group.names} saw {stats.count} valid token(s); need at least 2")
            vectors = torch.zeros(tracker.k, group.dim, dtype=torch.float64, device=stats.device)
            eigen = torch.zeros(tracker.k, dtype=torch.float64, device=stats.device)
            if self.comm.owns(index):
                pairs = tracker.finalize(stats)
                vectors, eigen = pairs.vectors.to(torch.float64), pairs.values.to(torch.float64)
            vectors = self.comm.broadcast_from_owner(vectors, index)
            eigen = self.comm.broadcast_from_owner(eigen, index)
            tracker.values, tracker.total_variance = eigen.cpu(), stats.total_variance()
            comps.append(vectors.to(torch.float32).cpu())
            values.append(eigen.cpu())
            ratios.append(eigen.cpu() / max(tracker.total_variance, 1e-300))
        self.ranks = self._allocate(lambda tracker: tracker.values)
        unconverged = self._unconverged()
        self._report(unconverged)
        shapes = {n: [in_features(m), _out_features(m)] for n, m in layers.items()}
        return EvaState(self.config, [list(g.names) for g in self.capture.groups], comps, values, ratios,
                        [self._stats(i).count for i in range(len(self.capture.groups))], self.ranks, shapes,
                        n_batches=self.n_batches, stop_reason=self.stop_reason, unconverged=unconverged,
                        history=self.history, versions=_versions())

    def _unconverged(self) -> list[str]:
        out = []
        for group, tracker in zip(self.capture.groups, self.trackers):
            need = max(self.ranks[n] for n in group.names)
            if not bool(tracker.converged[:need].all()):
                out.extend(group.names)
        return out

    def _report(self, unconverged: list[str]) -> None:
        if not unconverged or self.stop_reason == "delta":
            return
        message = (f"EVA stopped ({self.stop_reason}) after {self.n_batches} batches before {len(unconverged)} "
                   f"layer(s) converged: {unconverged[:8]}{' ...' if len(unconverged) > 8 else ''}; "
                   "raise max_batches, lower tau, or feed more data")
        if self.config.strict:
            raise EvaNotConvergedError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _tokens(self) -> int:
        return max((self._stats(i).count for i in range(len(self.capture.groups))), default=0)

    def _progress_text(self) -> str:
        done = sum(not g.active for g in self.capture.groups)
        return f"converged groups {done}/{len(self.capture.groups)}, tokens {self._tokens()}"


class _BadBatches(Exception):
    """Carries an error about the batches argument out of the generator, told apart from user errors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _bounded_stream(batches: Iterable[Any], limit: int) -> Iterator[tuple[int, Any]]:
    """Yield (epoch, batch) at most ``limit`` times, cycling re-iterables, consuming iterators once."""
    if isinstance(batches, Mapping) or isinstance(batches, torch.Tensor):
        raise _BadBatches(TypeError("batches must be an iterable of batches (e.g. a list of dicts or a "
                                    f"DataLoader), not a single {type(batches).__name__}"))
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


def _next_batch(stream: Iterator[tuple[int, Any]], done: int) -> tuple[int, Any] | None:
    """The next batch, or None at the end; an error inside the user's data pipeline is named as such."""
    try:
        return next(stream, None)
    except _BadBatches as err:  # our own complaint about the iterable itself
        raise err.error from None
    except Exception as err:
        raise RuntimeError(f"the batches iterable raised while producing batch {done + 1}: {err!r}") from err


def _require_finite(names: list[str], stats: CovarianceAccumulator) -> None:
    if not stats.is_finite():
        raise FloatingPointError(f"NaN or Inf activations reached layer(s) {names}")


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _model_device(model: nn.Module) -> torch.device | None:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else int(module.weight.shape[1])


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for dist in ("eva-lora", "transformers", "peft", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
