"""EvaConfig: every knob of EVA initialisation, validated on construction.

Symbols follow the paper (arXiv 2410.07170): ``rank`` is r, ``rho`` caps a layer at
``round(r * rho)`` components, ``tau`` is the cosine threshold for convergence and ``delta`` the
fraction of converged components that ends the loop early.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

RankMetric = Literal["ratio", "raw", "max"]
InitMode = Literal["eva", "perm", "rot", "redist_only"]

_METRICS = ("ratio", "raw", "max")
_INIT_MODES = ("eva", "perm", "rot", "redist_only")


@dataclass(frozen=True)
class EvaConfig:
    """Configuration of an EVA initialisation.

    Args:
        rank: LoRA rank r; the total budget is ``rank * number_of_adapted_layers``.
        rho: redistribution factor (>= 1); a layer may receive up to ``round(rank * rho)``.
            ``rho = 1`` gives exactly uniform ranks.
        tau: cosine similarity in (0, 1] between successive estimates of a component at which
            it counts as converged (paper default 0.99).
        delta: fraction of all needed components that, once converged, ends the loop (1.0 = all).
        target_modules: PEFT-style selection: a list of name suffixes, or a regex string that
            must match the full module name. ``None`` selects every linear layer except the
            output head (``lm_head`` / ``score`` / ``classifier`` / ``cls``).
        exclude_modules: same syntax; matched layers are skipped.
        max_batches: hard bound on forward passes; reaching it stops with a warning
            (``strict=True`` turns that into an error).
        check_every: run the convergence check every k batches (1 = after every batch, as in
            the paper). A larger k compares estimates k batches apart, which is stricter.
        use_label_mask: drop tokens whose label equals ``label_mask_value`` from the PCA.
        whiten: scale each component by ``1 / sqrt(eigenvalue)`` so ``A x`` has unit variance.
        adjust_alpha: change each layer's alpha with its new rank so its LoRA scaling is the
            one it would have had at rank ``rank`` (respects rsLoRA's ``alpha / sqrt(r)``).
        rank_metric: how components of different layers are compared when redistributing:
            ``ratio`` (explained variance ratio, paper default), ``raw`` (eigenvalue) or
            ``max`` (eigenvalue / the layer's largest eigenvalue).
        min_rank: floor for every layer (0 lets a layer drop out entirely).
        init_mode: ``eva`` or one of the paper's Table 7 ablations: ``perm`` (permute each
            row's entries), ``rot`` (random rotation of A), ``redist_only`` (EVA ranks, random A).
        seed: seeds every random choice (ablations, solver) without touching the global RNG.
        stats_dtype: dtype of the running second moment. float32 halves memory and time; the
            sums and the final solve are float64 either way. Use float64 for extreme dynamic range.
        progress: show a tqdm progress bar.
        strict: raise instead of warning when the loop ends before convergence.
        early_exit: end each forward pass right after the deepest layer that still needs data
            (EVA never uses the model's outputs). Once the late layers have converged this skips
            their cost; it is switched off automatically when a target layer runs twice per pass.
        distributed_inputs: under torch.distributed, whether ranks feed different batches
            ("sharded": statistics are summed), the same batches ("replicated": only the solves are
            shared out) or "auto" (decided from a checksum of the first batch). See distributed.py.
    """

    rank: int = 16
    rho: float = 2.0
    tau: float = 0.99
    delta: float = 1.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    max_batches: int = 1000
    check_every: int = 1
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_alpha: bool = True
    rank_metric: RankMetric = "ratio"
    min_rank: int = 0
    init_mode: InitMode = "eva"
    seed: int = 0
    stats_dtype: Literal["float32", "float64"] = "float32"
    progress: bool = True
    strict: bool = False
    early_exit: bool = True
    distributed_inputs: str = "auto"

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not all(isinstance(v, str) and v for v in value):
                    raise ValueError(f"{name} must be a list of non-empty strings, got {value!r}")
                object.__setattr__(self, name, tuple(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a list of strings, a regex string or None, got {type(value).__name__}")
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}")
        _check(self.rho >= 1.0, f"rho must be >= 1 (1 = uniform ranks), got {self.rho!r}")
        _check(0.0 < self.tau <= 1.0, f"tau must be in (0, 1], got {self.tau!r}")
        _check(0.0 < self.delta <= 1.0, f"delta must be in (0, 1], got {self.delta!r}")
        _check(isinstance(self.max_batches, int) and self.max_batches >= 1,
               f"max_batches must be an integer >= 1, got {self.max_batches!r}")
        _check(isinstance(self.check_every, int) and self.check_every >= 1,
               f"check_every must be an integer >= 1, got {self.check_every!r}")
        _check(self.rank_metric in _METRICS, f"rank_metric must be one of {_METRICS}, got {self.rank_metric!r}")
        _check(self.init_mode in _INIT_MODES, f"init_mode must be one of {_INIT_MODES}, got {self.init_mode!r}")
        _check(isinstance(self.min_rank, int) and 0 <= self.min_rank <= self.rank,
               f"min_rank must be an integer in [0, rank={self.rank}], got {self.min_rank!r}")
        _check(self.distributed_inputs in ("auto", "sharded", "replicated"),
               f"distributed_inputs must be 'auto', 'sharded' or 'replicated', got {self.distributed_inputs!r}")
        _check(self.stats_dtype in ("float32", "float64"),
               f"stats_dtype must be 'float32' or 'float64', got {self.stats_dtype!r}")

    @property
    def max_components(self) -> int:
        """Components computed per layer: ``round(rank * rho)`` (the per-layer rank cap)."""
        return max(1, round(self.rank * self.rho))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaConfig:
        """Build from a dict, naming unknown keys instead of ignoring them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EvaConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
