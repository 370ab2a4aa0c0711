"""compute_eva_state: feed batches, accumulate statistics, check convergence, allocate ranks.

The loop is a short sequence of named steps: a *probe* pass finds the input groups, *plan* gives
each group its statistic kind and owner process, then each batch is *forwarded* (hooks feed the
statistics) and *checked* (owners solve, everyone shares the numbers, ranks are re-allocated and
converged groups switched off). It is bounded by ``max_batches`` and always records why it stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .allocation import allocate_ranks, rank_scores
from .capture import ActivationCapture, LayerGroup, StopForward, TokenSelector, eager, probe_slice
from .checkpoint import GroupSnapshot, LoopSnapshot, load_snapshot, save_snapshot
from .config import EvaConfig
from .convergence import (
    ComponentTracker,
    advance,
    check_slack,
    final_eigenpairs,
    make_solver,
    residual_certified,
    subspace_epsilon,
)
from .diagnostics import flags as diagnostic_flags
from .distributed import CollectiveError, Communicator
from .loop_utils import (
    EvaProgress,
    bounded_stream,
    eval_mode,
    model_device,
    next_batch,
    to_device,
    versions,
)
from .numerics import batched_eigh, single_thread, statistics_precision
from .pca import Eigenpairs
from .planning import GroupPlan, plan_statistics
from .state import EvaState
from .statistics import (
    ExactStatistic,
    SketchStatistic,
    Statistic,
    compress_sketches,
    statistic_from_state_dict,
)
from .targets import find_target_layers, layer_shapes

if TYPE_CHECKING:
    from .sequential import SequentialOptions

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
    progress: bool = True,
    strict: bool = False,
    layers: Mapping[str, nn.Module] | None = None,
    sequential: bool | SequentialOptions = False,
) -> EvaState:
    """Compute EVA components and ranks for ``model`` from ``batches``.

    batches: any iterable; dict batches are fed as ``model(**batch)`` (tensors moved to the
    model's device), anything else as ``model(batch)`` unless ``forward_fn(model, batch)`` is given.
    A re-iterable (list, DataLoader) is cycled until convergence; an iterator is consumed once.
    select_tokens(layer_input, batch, layer_name) -> (n_tokens, in_features) replaces the default
    masking for inputs that are not (batch, seq, dim) / (n, dim).
    The model is left exactly as it was: no hook survives, train/eval mode is restored. A model
    wrapped by ``torch.compile`` is run eagerly (compiled code would skip the hooks).
    checkpoint_dir / checkpoint_every: save the statistics and solver state atomically every N
    batches; resume=True continues from the last checkpoint there (the batches must be the same
    sequence: the ones before the checkpoint are skipped, not fed) and gives the same result as an
    uninterrupted run. Without a checkpoint yet, resume starts from the first batch.
    layers: name -> module to capture, chosen by the caller instead of ``config.target_modules``
    (the PEFT drop-in passes the base layers of a PeftModel's LoRA layers).
    progress: show a bar of converged / needed components (on rank 0).
    strict: raise :class:`EvaNotConvergedError` instead of warning when the loop ends before every
    needed component converged.
    sequential: True or a :class:`~eva_lora.sequential.SequentialOptions`: run one decoder block at
    a time over a fixed calibration set (a model larger than the device, weights read from disk);
    see :mod:`eva_lora.sequential`. Token batches (dicts) only; no checkpoints.
    """
    config = config or EvaConfig()
    if sequential:
        from .sequential import SequentialOptions, sequential_eva_state

        if checkpoint_every or resume or forward_fn is not None or select_tokens is not None:
            raise ValueError(
                "sequential EVA takes token batches as they are: checkpoint_every, resume, "
                "forward_fn and select_tokens are for the whole-model loop"
            )
        options = sequential if isinstance(sequential, SequentialOptions) else SequentialOptions()
        return sequential_eva_state(
            model, batches, config, options, progress=progress, strict=strict, layers=layers
        )
    if (checkpoint_every or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every / resume need checkpoint_dir")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    with eager(model) as runnable, _no_kv_cache(runnable):
        layers = dict(layers) if layers is not None else find_target_layers(runnable, config)
        with eval_mode(runnable):
            capture = ActivationCapture(
                layers, config.use_label_mask, config.label_mask_value, select_tokens
            )
            with torch.no_grad(), capture:
                loop = _EvaLoop(runnable, capture, config, forward_fn, progress, strict)
                loop.checkpointing(checkpoint_dir, checkpoint_every, resume)
                loop.run(batches)
        return loop.build_state(layer_shapes(layers))


# A converged group keeps absorbing the batches the pass computes anyway
# (measured: MiniLM's whole-data captured variance at 42 passes, mean
# 0.977 -> 0.993; see benchmarks/README.md). False: it stops at once.
FEED_CONVERGED = True


@dataclass
class GroupRecord:
    """What the loop knows about one input group (on every rank; ``stat`` on its owner only)."""

    layer: LayerGroup
    plan: GroupPlan
    cap: int  # components computed: round(rank * rho), never above the input width
    tracker: ComponentTracker
    stat: Statistic | None = None
    tokens: int = 0  # rows the owner has absorbed, as last shared
    finite: bool = True
    stop_batch: int | None = None  # batch count at which the group last met the convergence rule
    final: Eigenpairs | None = None  # set by release_statistics: the result, the statistic freed

    @property
    def names(self) -> list[str]:
        return self.layer.names


class _EvaLoop:
    """The state of one run: group records, history and the reason it stopped."""

    probe_on_slice = True  # the probe pass runs on a short slice of the first batch

    def __init__(
        self,
        model: nn.Module,
        capture: ActivationCapture,
        config: EvaConfig,
        forward_fn: ForwardFn | None,
        progress: bool = True,
        strict: bool = False,
    ) -> None:
        self.model, self.capture, self.config, self.strict = model, capture, config, strict
        self.forward_fn = forward_fn or _default_forward
        self.device = model_device(model)
        self.comm = Communicator(config.distributed_inputs, self.device)
        self.groups: list[GroupRecord] = []
        self.ranks: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.steps = 0  # batches this process fed (or skipped on resume)
        self.n_batches = 0  # batches of all processes (= steps for one process)
        self.stop_reason = "max_batches"
        self.checkpoint_dir: Path | None = None
        self.checkpoint_every = 0
        self.started = time.perf_counter()
        self.fsdp_modules = _fsdp_modules(model)
        if self.fsdp_modules and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ValueError(
                "the model is sharded with FSDP but torch.distributed has no process group: start "
                "the run with torchrun / accelerate launch (or init_process_group) before "
                "compute_eva_state"
            )
        self.progress = EvaProgress(progress and self.comm.rank == 0, config.max_batches)

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpointing(self, directory: Any, every: int, resume: bool) -> None:
        self.checkpoint_dir = None if directory is None else Path(directory)
        self.checkpoint_every = every
        if (every or resume) and self.comm.active:
            raise ValueError(
                "checkpoints are single-process for now: under torch.distributed, leave "
                "checkpoint_every at 0 and resume unset"
            )
        if not resume:
            return
        snapshot = load_snapshot(self.checkpoint_dir)
        if snapshot is None:
            warnings.warn(
                f"no EVA checkpoint in {self.checkpoint_dir}: starting from the first batch",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        mine, theirs = (
            self.config.statistics_dict(),
            EvaConfig.from_dict(snapshot.config).statistics_dict(),
        )
        if mine != theirs:
            changed = sorted(k for k in mine if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"the checkpoint in {self.checkpoint_dir} was made with other settings: {changed}"
            )
        self.restore(snapshot)

    def snapshot(self) -> LoopSnapshot:
        """The loop's state as plain data: what a checkpoint holds."""
        groups = [
            GroupSnapshot(
                names=rec.names,
                dim=rec.layer.dim,
                kind=rec.plan.kind,
                size=rec.plan.size,
                active=rec.layer.active,
                tokens=rec.tokens,
                total_variance=rec.tracker.total_variance,
                stat=rec.stat.state_dict(),
                tracker=rec.tracker.state_dict(),
                stop_batch=rec.stop_batch,
            )
            for rec in self.groups
        ]
        return LoopSnapshot(
            self.steps,
            self.n_batches,
            self.config.to_dict(),
            self.capture.single_call,
            groups,
            dict(self.ranks),
            list(self.history),
        )

    def restore(self, snapshot: LoopSnapshot) -> None:
        """Continue from a snapshot exactly as if the run had never stopped (no probe pass)."""
        device = self.device or torch.device("cpu")
        self.capture.restore_groups(
            [(g.names, g.dim) for g in snapshot.groups], device, snapshot.single_call
        )
        for layer, saved in zip(self.capture.groups, snapshot.groups):
            plan = GroupPlan(saved.kind, saved.size, 0, 0)
            record = self._new_record(
                layer,
                plan,
                statistic_from_state_dict(saved.kind, saved.stat, self._stat_device(layer)),
            )
            record.tracker.load_state_dict(
                saved.tracker, saved.total_variance, self._stat_device(layer)
            )
            record.layer.active, record.tokens, record.stop_batch = (
                saved.active,
                saved.tokens,
                saved.stop_batch,
            )
        self.steps, self.n_batches = snapshot.steps, snapshot.n_batches
        self.ranks, self.history = dict(snapshot.ranks), list(snapshot.history)
        self.capture.set_exit_point(self._exit_enabled())

    # ---- the loop ------------------------------------------------------------------------
    def run(self, batches: Iterable[Any]) -> None:
        """Probe, then forward and check until converged, out of data or at max_batches."""
        stream = bounded_stream(batches, self.config.max_batches)
        for index in range(self.steps):  # resume: skip what the checkpoint already holds
            if next_batch(stream, index) is None:
                raise ValueError(
                    f"the batches ended after {index} of the {self.steps} batches the checkpoint "
                    "covers: resume needs the same batches in the same order"
                )
        try:
            while True:
                item = next_batch(stream, self.steps)
                if not self.comm.all_have_batch(item is not None):
                    self.stop_reason = (
                        "max_batches"
                        if self.n_batches >= self.config.max_batches
                        else "data_exhausted"
                    )
                    break
                epoch, batch = item
                if epoch > 0 and self.n_batches and self._tokens() == 0:
                    raise ValueError(
                        "no valid token in a full pass over the batches: every token is masked "
                        "(attention_mask / labels == label_mask_value)"
                    )
                on_device = to_device(batch, self.device)
                if not self.groups:
                    self._probe(on_device, batch)
                self._forward(on_device, batch)
                if self.steps % self.config.check_every == 0 and self._check():
                    break
                if self.checkpoint_every and self.steps % self.checkpoint_every == 0:
                    save_snapshot(self.checkpoint_dir, self.snapshot())
                if self.n_batches >= self.config.max_batches:
                    self.stop_reason = "max_batches"
                    break
        finally:
            self.progress.close()
        if self.groups:
            self._share()  # token counts of the batches since the last check
        if self._tokens() == 0:
            raise ValueError(
                "no valid token reached the target layers: every token is masked or batches are "
                "empty"
            )

    def _probe(self, batch: Any, host_batch: Any = None) -> None:
        """The pass that groups the layers and finds their order, then each group's plan.

        It runs on one short sequence cut from the first batch
        (:func:`~eva_lora.capture.probe_slice`), so the references it keeps to every layer input
        cost nothing; if that slice fails or misses a layer (a router that sends 16 tokens to few
        experts), it runs again on the whole batch.
        """
        small = probe_slice(batch) if self.probe_on_slice else None
        if small is not None:
            try:
                self.capture.set_batch(
                    small, probe_slice(host_batch) if host_batch is not None else None
                )
                self._call_model(small, probe=True)
            except (RuntimeError, ValueError, IndexError, TypeError):
                small = None
            if small is None or self.capture.missing_layers():
                self.capture.restart_probe()
                small = None
        if small is None:
            self.capture.set_batch(batch, host_batch)
            self._call_model(batch, probe=True)
        self.capture.finish_probe()
        self.comm.resolve_mode(batch)
        self.comm.check_same_groups([g.names for g in self.capture.groups])
        layers = self.capture.groups
        plans = plan_statistics(
            [g.dim for g in layers], self.config, self.comm.size, [g.names[0] for g in layers]
        )
        for layer, plan in zip(layers, plans):
            mine = plan.owner == self.comm.rank
            self._new_record(layer, plan, self._new_statistic(layer, plan) if mine else None)
        narrow = [g.names[0] for g in layers if g.dim < self.config.max_components]
        if narrow and self.comm.rank == 0:
            warnings.warn(
                f"{len(narrow)} layer group(s) are narrower than the {self.config.max_components} "
                f"components asked for (round(rank * rho)), so they get at most their width: "
                f"{narrow[:4]}{' ...' if len(narrow) > 4 else ''}",
                stacklevel=2,
            )
        self.capture.set_exit_point(self._exit_enabled())

    def _new_statistic(self, layer: LayerGroup, plan: GroupPlan) -> Statistic:
        dtype, device = getattr(torch, self.config.stats_dtype), self._stat_device(layer)
        if plan.kind == "exact":
            return ExactStatistic(layer.dim, device, dtype)
        return SketchStatistic(layer.dim, plan.size, device, dtype, seed=self.config.seed)

    def _new_record(
        self, layer: LayerGroup, plan: GroupPlan, stat: Statistic | None
    ) -> GroupRecord:
        cap = min(self.config.max_components, layer.dim)
        tracker = ComponentTracker(cap, make_solver(plan.kind, cap, layer.dim, self.config.seed))
        record = GroupRecord(layer, plan, cap, tracker, stat)
        layer.sink = self._sink(record)
        self.groups.append(record)
        return record

    def _stat_device_type(self) -> torch.device:
        """Where the statistics live (their small solves run on one thread when that is the CPU)."""
        if self.config.statistics_device == "cpu" or self.device is None:
            return torch.device("cpu")
        return self.device

    def _stat_device(self, layer: LayerGroup) -> torch.device:
        return torch.device("cpu") if self.config.statistics_device == "cpu" else layer.device

    def _sink(self, record: GroupRecord) -> Callable[[torch.Tensor], None] | None:
        """Where a group's rows go on this process: its statistic, the owner, or nowhere."""
        stat, owner, tf32 = record.stat, record.plan.owner, self.config.statistics_tf32
        if self.comm.sums_statistics:

            def send(rows: torch.Tensor) -> None:
                with statistics_precision(tf32):
                    for part in self.comm.gather_rows(rows, owner) or []:
                        stat.update(part)

            return send
        if stat is None:
            return None

        def absorb(rows: torch.Tensor) -> None:
            with statistics_precision(tf32):
                stat.update(rows)

        return absorb

    def _forward(self, batch: Any, host_batch: Any = None) -> None:
        self.capture.set_batch(batch, host_batch, count=True)
        self._call_model(batch, probe=False)
        self.steps += 1
        self.n_batches += self.comm.size if self.comm.sums_statistics else 1

    def _call_model(self, batch: Any, probe: bool) -> None:
        try:
            self.forward_fn(self.model, batch)
        except StopForward:
            # FSDP2 reshards in post-forward hooks the exit skipped
            for module in self.fsdp_modules:
                module.reshard()
        except CollectiveError:  # raised by a hook's gather: another rank is gone, not a model bug
            raise
        except Exception as err:
            what = f"batch {self.steps + 1}" + (" (probe pass)" if probe else "")
            raise RuntimeError(f"the model's forward pass failed on {what}: {err}") from err

    def _exit_enabled(self) -> bool:
        return self.config.early_exit

    # ---- convergence ---------------------------------------------------------------------
    def _check(self) -> bool:
        """Owners solve their active groups, everyone shares the numbers, ranks are re-allocated.
        True when the loop may stop."""
        self._solve()
        self._share()
        self.ranks = self._allocate()
        needed = converged = 0
        for record in self.groups:
            # a group without an estimate yet (fewer tokens than components
            # so far) cannot be judged: its rank from the provisional
            # allocation may be 0, but it must keep absorbing rows
            estimated = record.tracker.values is not None
            need = max(self.ranks[n] for n in record.names) if estimated else record.cap
            done = converged_prefix(record.tracker.converged, need) if estimated else 0
            if done >= need and record.stop_batch is None:
                record.stop_batch = self.n_batches
            elif done < need:
                record.stop_batch = None
            if isinstance(record.stat, SketchStatistic):
                # explore at every batch while converging; once only fed, every sketch_window
                # batches, refining the kept directions in between
                record.stat.explore_every = (
                    1 if record.stop_batch is None else self.config.sketch_window
                )
            needed, converged = needed + need, converged + done
        self._set_feeding()
        self.capture.set_exit_point(self._exit_enabled())
        self.history.append(
            {
                "batch": self.n_batches,
                "tokens": self._tokens(),
                "needed_components": needed,
                "converged_components": converged,
                "active_groups": sum(r.stop_batch is None for r in self.groups),
                "forward_ends_after": self.capture.exit_layer,
                "statistic_bytes": sum(r.stat.nbytes for r in self.groups if r.stat is not None),
                "bytes_communicated": self.comm.bytes_sent,
                "seconds": round(time.perf_counter() - self.started, 4),
            }
        )
        self.progress.update(self.history[-1], len(self.groups))
        if converged == needed:
            self.stop_reason = "converged"
            return True
        if self.config.delta < 1.0 and converged >= self.config.delta * needed:
            self.stop_reason = "delta"
            return True
        return False

    def _set_feeding(self) -> None:
        """Which groups absorb the next batches: those still converging and, with
        ``FEED_CONVERGED``, also the converged groups the pass reaches anyway (at or before the
        deepest unconverged one in execution order). Their rows cost one matmul each and no pass;
        their final components then use every batch the loop ran, not only those until they met the
        rule."""
        needy = [r.stop_batch is None for r in self.groups]
        last = max((i for i, n in enumerate(needy) if n), default=-1)
        for index, record in enumerate(self.groups):
            record.layer.active = needy[index] or (FEED_CONVERGED and index <= last)

    def _solve(self) -> None:
        """Every active group this process owns: fold sketch windows in, solve, measure the loss.

        The small eigenproblems of all groups go through one batched call per size, and everything
        a decision needs is read back in one transfer per device (:func:`read_together`)."""
        active = [r for r in self.groups if r.layer.active and r.stat is not None]
        with (
            statistics_precision(self.config.statistics_tf32),
            single_thread(self._stat_device_type()),
        ):
            sketches = [r.stat for r in active if isinstance(r.stat, SketchStatistic)]
            # a converging group's window (explore_every 1) is due at every check, whatever
            # check_every, so every judged group is folded here; a converged group's refining
            # window stays open until its next exploration (it is not judged again)
            compress_sketches([s for s in sketches if s.window_due])
            # converged groups that are still fed are not judged again; groups that have seen
            # fewer tokens than components wait
            ready = [r for r in active if r.stop_batch is None and r.stat.count > r.cap]
            references = {id(r): r.tracker.reference(r.stat.count) for r in ready}
            exact = [r for r in ready if isinstance(r.stat, ExactStatistic)]
            requests = [r.tracker.solver.request(r.stat, references[id(r)]) for r in exact]
            solved = dict(zip(map(id, exact), batched_eigh(requests)))
            packs = []
            for record in ready:
                solver = record.tracker.solver
                if id(record) in solved:
                    pairs = solver.solve(*solved[id(record)])
                    trusted = residual_certified(pairs, record.cap, check_slack(self.config.tau))
                else:
                    pairs = solver.estimate(record.stat)
                    trusted = torch.ones(record.cap, dtype=torch.bool)
                packs.append(
                    record.tracker.measure(record.stat, pairs, trusted, references[id(record)])
                )
            advance([r.tracker.solver for r in exact])
        epsilon = subspace_epsilon(self.config.tau)
        for record, row in zip(ready, read_together(packs)):
            record.finite = record.tracker.decide(row, epsilon)

    def _share(self) -> None:
        """Owners pack (solved?, tokens, total variance, finite, values, converged) per group; one
        all-reduce gives every rank the same numbers. NaN / Inf raises on every rank at once."""
        for record in self.groups:
            if record.stat is not None:
                record.tokens = record.stat.count
        if self.comm.active:
            width = 4 + 2 * max(r.cap for r in self.groups)
            packed = torch.zeros(len(self.groups), width, dtype=torch.float64)
            for index, record in enumerate(self.groups):
                if record.stat is not None:
                    _pack(packed[index], record)
            packed = self.comm.share_solutions(packed)
            for index, record in enumerate(self.groups):
                if record.stat is None:
                    _unpack(packed[index], record)
        bad = [r.names for r in self.groups if not r.finite]
        if bad:
            raise FloatingPointError(f"NaN or Inf activations reached layer(s) {bad[0]}")

    def _allocate(self) -> dict[str, int]:
        """Ranks from the current spectra; a group without an estimate yet keeps its full cap."""
        scores: dict[str, torch.Tensor] = {}
        caps: dict[str, int] = {}
        for record in self.groups:
            values = record.tracker.values
            if values is None:
                score = torch.full((record.cap,), float("inf"), dtype=torch.float64)
            else:
                score = rank_scores(values, record.tracker.total_variance, self.config.rank_metric)
            for name in record.names:
                scores[name], caps[name] = score, record.cap
        order = [n for n in self.capture.layers if n in scores]
        budget = self.config.rank * len(order)
        return allocate_ranks({n: scores[n] for n in order}, budget, caps, self.config.min_rank)

    def release_statistics(self) -> None:
        """Solve every group this process owns now and free its statistic; the result stays on CPU.

        Sequential EVA calls it after each block: a finished block's statistics (5 GB for all of
        Llama-3-70B's at rank 16) would otherwise stay on the device until the end."""
        owned = [r for r in self.groups if r.stat is not None]
        for record, pairs in zip(owned, self._finalize(owned)):
            record.tokens = record.stat.count
            record.final = Eigenpairs(
                pairs.values.cpu(),
                pairs.vectors.cpu(),
                None if pairs.residuals is None else pairs.residuals.cpu(),
            )
            record.stat = None

    def _finalize(self, records: list[GroupRecord]) -> list[Eigenpairs]:
        """The reported components of groups this process owns (their statistics), solved
        together (:func:`~eva_lora.convergence.final_eigenpairs`), and each group's total
        variance, read in one transfer."""
        if not records:
            return []
        with single_thread(self._stat_device_type()):
            pairs = final_eigenpairs([r.tracker.solver for r in records], [r.stat for r in records])
            totals = read_together([r.stat.total_variance().reshape(1) for r in records])
        for record, (total,) in zip(records, totals):
            record.tracker.total_variance = total
        return pairs

    def adopt(self, parts: list[_EvaLoop]) -> None:
        """Take over the groups of loops that each ran one part of the model (sequential EVA), so
        that ranks are allocated across the whole model and one state is built."""
        self.groups = [record for part in parts for record in part.groups]
        self.n_batches = max(part.n_batches for part in parts)
        self.steps = max(part.steps for part in parts)
        self.history = [
            dict(entry, part=index) for index, part in enumerate(parts) for entry in part.history
        ]
        # every part saw the same calibration batches
        self.capture.counts = dict(parts[0].capture.counts)
        done = all(r.stop_batch is not None for r in self.groups)
        self.stop_reason = "converged" if done else parts[-1].stop_reason

    # ---- result --------------------------------------------------------------------------
    def build_state(self, shapes: Mapping[str, list[int]]) -> EvaState:
        thin = [r.names for r in self.groups if r.tokens < 2]
        if thin:
            count = next(r.tokens for r in self.groups if r.tokens < 2)
            raise ValueError(f"layer(s) {thin[0]} saw {count} valid token(s); need at least 2")
        comps, values, ratios = [], [], []
        solving = [r for r in self.groups if r.final is None and r.stat is not None]
        solved = dict(zip(map(id, solving), self._finalize(solving)))
        finals = [r.final if r.final is not None else solved.get(id(r)) for r in self.groups]
        for record, pairs in zip(self.groups, finals):
            vectors = torch.zeros(record.cap, record.layer.dim, dtype=torch.float64)
            eigen = torch.zeros(record.cap, dtype=torch.float64)
            if pairs is not None:
                vectors, eigen = (
                    pairs.vectors.to(torch.float64).cpu(),
                    pairs.values.to(torch.float64).cpu(),
                )
            vectors = self.comm.broadcast_from(vectors, record.plan.owner)
            eigen = self.comm.broadcast_from(eigen, record.plan.owner)
            record.tracker.values = eigen
            comps.append(vectors.to(torch.float32))
            values.append(eigen)
            ratios.append(eigen / max(record.tracker.total_variance, 1e-300))
        self.ranks = self._allocate()
        unconverged = self._unconverged()
        self._report(unconverged)
        agreement = [self._agreement(r) for r in self.groups]
        state = EvaState(
            config=self.config,
            groups=[list(r.names) for r in self.groups],
            group_components=comps,
            group_eigenvalues=values,
            group_ratios=ratios,
            group_tokens=[r.tokens for r in self.groups],
            ranks=self.ranks,
            layer_shapes=dict(shapes),
            n_batches=self.n_batches,
            stop_reason=self.stop_reason,
            unconverged=unconverged,
            history=self.history,
            versions=versions(),
            group_statistics=[r.plan.kind for r in self.groups],
            group_stop_batches=[r.stop_batch for r in self.groups],
            group_stability=agreement,
            token_counts=_nonempty(self.capture.counts),
        )
        for text in diagnostic_flags(state):
            warnings.warn(text, RuntimeWarning, stacklevel=4)
        return state

    def _agreement(self, record: GroupRecord) -> float | None:
        """1 - the subspace loss, at the group's rank, of its estimate on at most half of the tokens
        (the last check's): how much the components still moved with more data."""
        need = max(self.ranks[n] for n in record.names)
        loss = record.tracker.loss
        if not need or loss is None or need > len(loss):
            return None
        return round(min(1.0, max(0.0, 1.0 - float(loss[need - 1]))), 6)

    def _unconverged(self) -> list[str]:
        out = []
        for record in self.groups:
            need = max(self.ranks[n] for n in record.names)
            if converged_prefix(record.tracker.converged, need) < need:
                out.extend(record.names)
        return out

    def _report(self, unconverged: list[str]) -> None:
        if not unconverged or self.stop_reason == "delta":
            return
        message = (
            f"EVA stopped ({self.stop_reason}) after {self.n_batches} batches before "
            f"{len(unconverged)} "
            f"layer(s) converged: {unconverged[:8]}{' ...' if len(unconverged) > 8 else ''}; "
            "raise max_batches, lower tau, or feed more data"
        )
        if self.strict:
            raise EvaNotConvergedError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _tokens(self) -> int:
        return max((r.tokens for r in self.groups), default=0)


def _pack(row: torch.Tensor, record: GroupRecord) -> None:
    """Pack a group its owner holds into ``row``.

    [has estimate, tokens, total variance, finite, values (k), converged (k)]."""
    tracker, k = record.tracker, record.cap
    row[1], row[2], row[3] = float(record.tokens), tracker.total_variance, float(record.finite)
    if tracker.values is not None:
        row[0] = 1.0
        row[4 : 4 + k] = tracker.values
        row[4 + k : 4 + 2 * k] = torch.tensor(tracker.converged, dtype=torch.float64)


def _unpack(row: torch.Tensor, record: GroupRecord) -> None:
    tracker, k = record.tracker, record.cap
    record.tokens, tracker.total_variance, record.finite = (
        int(round(float(row[1]))),
        float(row[2]),
        bool(row[3] > 0.5),
    )
    if row[0] == 1.0:
        tracker.values = row[4 : 4 + k].clone()
        tracker.converged = (row[4 + k : 4 + 2 * k] > 0.5).tolist()


def _nonempty(counts: dict[str, int]) -> dict[str, int]:
    return counts if counts.get("batches") else {}


def converged_prefix(flags: list[bool], need: int) -> int:
    """A group's converged component count: the longest prefix up to ``need`` that met the rule."""
    return max((j + 1 for j, hit in enumerate(flags[:need]) if hit), default=0)


def read_together(packs: list[torch.Tensor]) -> list[list[float]]:
    """All groups' packed numbers as Python floats: one transfer per device, however many groups."""
    out: list[list[float]] = [[] for _ in packs]
    by_device: dict[torch.device, list[int]] = {}
    for index, pack in enumerate(packs):
        by_device.setdefault(pack.device, []).append(index)
    for indices in by_device.values():
        width = max(packs[i].numel() for i in indices)
        stack = torch.stack(
            [torch.nn.functional.pad(packs[i], (0, width - packs[i].numel())) for i in indices]
        )
        host = stack.cpu().tolist()
        for slot, index in enumerate(indices):
            out[index] = host[slot][: packs[index].numel()]
    return out


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Any:
    """transformers models build a KV cache each forward unless told not to; EVA never reads it."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _default_forward(model: nn.Module, batch: Any) -> Any:
    # labels only mask tokens: passed on, the model would compute a loss
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _fsdp_modules(model: nn.Module) -> list[Any]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
