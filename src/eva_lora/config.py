"""EvaConfig: every setting of an EVA initialisation, checked on construction.

Symbols follow the paper (arXiv 2410.07170): ``rank`` is r, ``rho`` caps a layer at
``round(r * rho)`` components, ``tau`` is the cosine threshold for convergence and ``delta`` the
fraction of converged components that ends the loop early.

The fields fall in two parts. Most decide the statistics and when the loop stops; a checkpoint
must match them to be resumed (:meth:`EvaConfig.statistics_dict`). Three are applied only when
LoRA's ``A`` is built from a finished state (:attr:`EvaConfig.init_options`: ``whiten``,
``adjust_alpha``, ``init_mode``) and may change between a checkpoint and its resume.
What is only shown or where work happens (a progress bar, raising instead of warning) are arguments
of :func:`~eva_lora.compute_eva_state`, not configuration.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .fields import check_fields, coerce_numbers, unknown_keys

RankMetric = Literal["ratio", "raw", "max"]
InitMode = Literal["eva", "perm", "rot", "redist_only"]
INIT_FIELDS = ("whiten", "adjust_alpha", "init_mode")  # used when A is built, after the statistics
RUNTIME_FIELDS = ("statistics_device", "statistics_tf32")  # where / how the work happens
# target_modules names that are not regexes
SELECTION_KEYWORDS = ("all-linear", "all-linear-and-head")


@dataclass(frozen=True)
class InitOptions:
    """How a finished EVA state becomes LoRA's ``A`` (see :func:`~eva_lora.initial_lora_a`)."""

    whiten: bool = False
    adjust_alpha: bool = True
    init_mode: InitMode = "eva"


@dataclass(frozen=True)
class EvaConfig:
    """Configuration of an EVA initialisation.

    Statistics and stopping (a checkpoint must match these):
        rank: LoRA rank r; the total budget is ``rank * number_of_adapted_layers``.
        rho: redistribution factor (>= 1); a layer may receive up to ``round(rank * rho)``.
            ``rho = 1`` gives exactly uniform ranks.
        tau: convergence threshold in [0, 1] (paper default 0.99; small values stop as soon as a
            group has an older estimate to compare with). The paper reads it as the cosine between
            successive estimates of each component; eva-lora applies it to each group's subspace:
            the estimate of the components a layer needs, made on at most half of the tokens seen,
            may miss at most ``epsilon = min(4 * (1 - tau^2), 1)`` of the variance of the best
            subspace now (the factor 4 was measured: benchmarks/README.md)
            (:mod:`eva_lora.convergence`). ``implementation="peft"`` in the PEFT drop-in keeps
            PEFT's per-component test.
        delta: fraction of all needed components that, once converged, ends the loop (1.0 = all).
        target_modules: PEFT-style selection: a list of name suffixes, or a regex string that
            must match the full module name. ``None`` selects every linear layer except the
            output head (``lm_head`` / ``score`` / ``classifier`` / ``cls``).
        exclude_modules: same syntax; matched layers are skipped.
        max_batches: hard bound on forward passes; reaching it stops with a warning.
        check_every: run the convergence check every k batches (1 = after every batch, as in
            the paper). A larger k compares estimates k batches apart, which is stricter.
        use_label_mask: drop tokens whose label equals ``label_mask_value`` from the PCA.
        rank_metric: how components of different layers are compared when redistributing:
            ``ratio`` (explained variance ratio, paper default), ``raw`` (eigenvalue) or
            ``max`` (eigenvalue / the layer's largest eigenvalue).
        min_rank: floor for every layer (0 lets a layer drop out entirely).
        seed: seeds every random choice (ablations, solver) without touching the global RNG.
        stats_dtype: dtype of the running statistics' large tensors. float32 halves memory and time;
            sums, counts and the small solves are float64 either way.
        early_exit: end each forward pass right after the deepest layer that still needs data
            (EVA never uses the model's outputs). Once the late layers have converged this skips
            their cost; it is switched off automatically when a target layer runs twice per pass.
        distributed_inputs: under torch.distributed, whether ranks feed different batches
            ("sharded": every rank's rows go to the group's owner), the same batches ("replicated":
            only the owner keeps them) or "auto" (decided from a checksum of the first batch).
        statistics: the running statistic of each group: "exact" (d x d second moment, exact,
            d^2 memory), "sketch" (incremental PCA keeping ``sketch_size`` directions, d x
            sketch_size memory) or "auto" (exact where ``d <= exact_max_dim``, sketch elsewhere).
        sketch_size: directions a sketch keeps; default 4 x round(rank * rho). Must be at least the
            round(rank * rho) components a layer may need.
        sketch_window: batches between a sketch's explorations once its group has converged.
            A sketch explores new directions (a random range and a power step of the batch: about
            as many matrix products as absorbing the batch twice) when a window opens and folds the
            window in at a check. While its group converges it explores at every batch (what it
            has not explored, it cannot see, and the convergence rule would not notice); a
            converged group that is still fed (to refine its components with every batch the pass
            computes anyway) explores in one batch of every ``sketch_window`` and in the others
            absorbs its rows inside the kept directions only (a third of the cost). 1 explores at
            every batch.
        exact_max_dim: widest group ``auto`` keeps an exact statistic for.
        statistics_budget_mb: memory cap for the statistics one process holds. ``auto`` turns exact
            groups into sketches (largest first) to fit; a budget too small for any kind is an error
            raised before the first statistic is allocated.
    Where the work happens (free to change on resume):
        statistics_device: "model" keeps statistics on the model's device; "cpu" keeps them in host
            memory (rows are copied over at each batch) for when the accelerator is full.
        statistics_tf32: let the statistics' float32 products use TF32 on GPUs that have it (faster,
            10 mantissa bits). Off by default: they run at full float32 precision whatever the
            user's ``torch.backends.cuda.matmul`` setting for training.
    Applied when A is built (:attr:`init_options`, free to change on resume):
        whiten: scale each component by ``1 / sqrt(eigenvalue)`` so ``A x`` has unit variance.
        adjust_alpha: change each layer's alpha with its new rank so its LoRA scaling is the
            one it would have had at rank ``rank`` (respects rsLoRA's ``alpha / sqrt(r)``).
        init_mode: ``eva`` or one of the paper's Table 7 ablations: ``perm`` (permute each
            row's entries), ``rot`` (random rotation of A), ``redist_only`` (EVA ranks, random A).
    """

    rank: int = field(default=16, metadata={"min": 1})
    rho: float = field(default=2.0, metadata={"min": 1.0})
    tau: float = field(default=0.99, metadata={"min": 0.0, "max": 1.0})
    delta: float = field(default=1.0, metadata={"above": 0.0, "max": 1.0})
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    max_batches: int = field(default=1000, metadata={"min": 1})
    check_every: int = field(default=1, metadata={"min": 1})
    use_label_mask: bool = True
    label_mask_value: int = -100
    rank_metric: RankMetric = "ratio"
    min_rank: int = field(default=0, metadata={"min": 0})
    seed: int = 0
    stats_dtype: Literal["float32", "float64"] = "float32"
    early_exit: bool = True
    distributed_inputs: Literal["auto", "sharded", "replicated"] = "auto"
    statistics: Literal["auto", "exact", "sketch"] = "auto"
    sketch_size: int | None = field(default=None, metadata={"min": 1})
    sketch_window: int = field(default=8, metadata={"min": 1})
    exact_max_dim: int = field(default=1024, metadata={"min": 1})
    statistics_budget_mb: float | None = field(default=None, metadata={"above": 0.0})
    statistics_device: Literal["model", "cpu"] = "model"
    statistics_tf32: bool = False
    whiten: bool = False
    adjust_alpha: bool = True
    init_mode: InitMode = "eva"

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_fields(self)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value not in SELECTION_KEYWORDS:
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(
                        f"{name} {value!r} is not a valid regular expression: {err}"
                    ) from None
        if self.min_rank > self.rank:
            raise ValueError(
                f"min_rank must be an integer in [0, rank={self.rank}], got {self.min_rank!r}"
            )
        k = self.max_components
        if self.sketch_size is not None and self.sketch_size < k:
            raise ValueError(
                f"sketch_size must be an integer >= the {k} components a layer may need "
                f"(round(rank * rho)); got {self.sketch_size!r} (default: 4 x {k} = {4 * k})"
            )

    @property
    def max_components(self) -> int:
        """Components computed per layer: ``round(rank * rho)`` (the per-layer rank cap)."""
        return max(1, round(self.rank * self.rho))

    @property
    def resolved_sketch_size(self) -> int:
        """Directions a sketch keeps: ``sketch_size``, or 4 x the components a layer may need."""
        return self.sketch_size if self.sketch_size is not None else 4 * self.max_components

    @property
    def init_options(self) -> InitOptions:
        return InitOptions(self.whiten, self.adjust_alpha, self.init_mode)

    def statistics_dict(self) -> dict[str, Any]:
        """The fields the running computation depends on: what a checkpoint must match to resume."""
        out = self.to_dict()
        for key in INIT_FIELDS + RUNTIME_FIELDS:
            out.pop(key)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaConfig:
        """Build from a dict, naming unknown keys instead of ignoring them.

        ``progress`` and ``strict`` (EvaConfig fields before 0.2, now arguments of
        ``compute_eva_state``) are accepted and dropped, so older state files still load.
        """
        data = {k: v for k, v in data.items() if k not in ("progress", "strict")}
        unknown_keys(data, cls, "EvaConfig")
        return cls(**coerce_numbers(data, cls))
