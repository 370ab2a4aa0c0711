"""Convergence of each group's top components, batch after batch (paper Algorithm 1, line 4).

A component has converged when its |cosine| with the previous estimate is >= tau *and* the solver
vouches for the new estimate. The second condition matters for the exact statistic, whose solver is
a warm-started subspace iteration: an iterate that has stalled away from an eigenvector would
otherwise look "stable". A sketch's estimate is the exact top of the sketch, so it is always vouched for.

Solvers turn a statistic into eigenpairs and carry whatever they warm-start from:
- :class:`SubspaceIteration` for :class:`~eva_lora.statistics.ExactStatistic` (one product with the
  covariance, a QR and a small ``eigh`` per check; an exact solve for tiny layers);
- :class:`SketchSolver` for :class:`~eva_lora.statistics.SketchStatistic` (reads the sketch's top rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .pca import Eigenpairs, component_cosine, exact_eigenpairs, rayleigh_ritz

WARMUP_STEPS = 3
FINAL_SLACK = 1e-3  # relative residual of the reported components (exact statistic)


def oversampled(k: int, dim: int) -> int:
    """Block size of the iterative solver: k wanted components plus a margin that speeds it up."""
    return min(dim, k + max(8, k // 2))


def check_slack(tau: float) -> float:
    """Relative residual allowed at a check: the sine of the angle that tau tolerates."""
    return max((1.0 - tau * tau) ** 0.5, 1e-3)


def residual_certified(pairs: Eigenpairs, k: int, slack: float) -> torch.Tensor:
    """(k,) bool: ``||C v_j - theta_j v_j|| <= slack * theta_j``.

    A warm-started iterate that has stalled away from an eigenvector keeps a large residual, so
    a small relative residual is what makes "the estimate stopped moving" mean "it converged".
    """
    scale = pairs.values[:k].abs().clamp_min(torch.finfo(pairs.values.dtype).tiny)
    return pairs.residuals[:k] <= slack * scale


class SubspaceIteration:
    """Warm-started subspace iteration on an exact statistic: one power step per check."""

    def __init__(self, k: int, dim: int, seed: int = 0) -> None:
        self.k, self.dim, self.seed = k, dim, seed
        self.m = oversampled(k, dim)
        self.basis: torch.Tensor | None = None  # (dim, m) orthonormal columns

    def estimate(self, stats: Any, tau: float) -> tuple[Eigenpairs, torch.Tensor]:
        """(pairs, trusted): the current estimate and which of its k components the residual vouches for."""
        pairs = self._step(stats)
        return pairs, residual_certified(pairs, self.k, check_slack(tau))

    def final(self, stats: Any, max_iter: int | None = None) -> Eigenpairs:
        """The reported components: iterated to a relative residual of 1e-3, else solved exactly.

        An iteration costs ``d^2 m`` and a full ``eigh`` about ``10 d^3``, so wide layers (whose
        flat spectra converge slowly) get more iterations before the fallback."""
        if max_iter is None:
            max_iter = 30 if self.dim <= 2048 else 300
        for _ in range(max_iter if self.basis is not None else 0):
            pairs = self._step(stats)
            if bool(residual_certified(pairs, self.k, FINAL_SLACK).all()):
                return _head(pairs, self.k)
        return _head(exact_eigenpairs(stats.covariance(), self.k), self.k)

    def _step(self, stats: Any) -> Eigenpairs:
        acc = stats.acc
        if self.m >= self.dim:  # tiny layer: the exact solve is as cheap as an iteration
            return exact_eigenpairs(acc.covariance(), self.m)
        if self.basis is None:
            self.basis = self._random_basis(acc)
        pairs, applied = rayleigh_ritz(acc.covariance_product(self.basis), self.basis)
        # contiguous: QR returns column-major Q, and a checkpointed basis comes back row-major; the
        # same layout keeps a resumed run's matmuls (and so its result) bit-identical.
        self.basis = torch.linalg.qr(applied).Q.contiguous()
        return pairs

    def _random_basis(self, acc: Any) -> torch.Tensor:
        """Seeded Gaussian start (no global RNG), refined by a few power steps."""
        generator = torch.Generator().manual_seed(self.seed)
        basis = torch.randn(self.dim, self.m, generator=generator, dtype=acc.moment.dtype).to(acc.device)
        for _ in range(WARMUP_STEPS):
            basis = torch.linalg.qr(acc.covariance_product(torch.linalg.qr(basis).Q)).Q
        return basis.contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.basis is None else {"basis": self.basis}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
        self.basis = state["basis"].to(device).contiguous() if "basis" in state else None


class SketchSolver:
    """The sketch holds its own eigen-decomposition: a check reads its top ``k`` rows."""

    def __init__(self, k: int) -> None:
        self.k = k

    def estimate(self, stats: Any, tau: float) -> tuple[Eigenpairs, torch.Tensor]:
        pairs = stats.top(self.k)
        return pairs, torch.ones(self.k, dtype=torch.bool)

    def final(self, stats: Any) -> Eigenpairs:
        return _head(stats.top(self.k), self.k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
        pass


def make_solver(kind: str, k: int, dim: int, seed: int) -> SubspaceIteration | SketchSolver:
    """The solver for a statistic kind (every rank builds one; only the group's owner calls it)."""
    if kind == "exact":
        return SubspaceIteration(k, dim, seed)
    if kind == "sketch":
        return SketchSolver(k)
    raise ValueError(f"unknown statistic kind {kind!r}")


@dataclass
class ComponentTracker:
    """Latest estimate and convergence flags of one group's ``k`` components."""

    k: int
    solver: Any
    previous: torch.Tensor | None = None  # (k, dim) last estimate, float32
    values: torch.Tensor | None = None  # (k,) eigenvalues, float64, CPU
    total_variance: float = 0.0
    converged: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        if self.converged.numel() != self.k:
            self.converged = torch.zeros(self.k, dtype=torch.bool)

    def check(self, stats: Any, tau: float) -> None:
        """Re-solve from the current statistic and update which components have converged."""
        if stats.count <= self.k:  # fewer tokens than components: keep accumulating
            return
        pairs, trusted = self.solver.estimate(stats, tau)
        trusted = trusted.cpu()
        current = pairs.vectors[: self.k].to(torch.float32)  # kept until the next check: float32 is plenty
        if self.previous is not None:
            cosine = component_cosine(self.previous.to(current), current).cpu()
            self.converged = (cosine >= tau) & trusted
        self.previous = current
        self.values = pairs.values[: self.k].to(torch.float64).cpu()
        self.total_variance = stats.total_variance()

    def finalize(self, stats: Any) -> Eigenpairs:
        self.total_variance = stats.total_variance()
        return self.solver.final(stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"solver.{k}": v for k, v in self.solver.state_dict().items()}
        for key in ("previous", "values"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["converged"] = self.converged.to(torch.uint8)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], total_variance: float,
                        device: torch.device | str) -> None:
        self.solver.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("solver.")}, device)
        self.previous = state["previous"].to(device) if "previous" in state else None
        self.values = state["values"].cpu() if "values" in state else None
        self.converged = state["converged"].bool().cpu()
        self.total_variance = total_variance


def _head(pairs: Eigenpairs, k: int) -> Eigenpairs:
    return Eigenpairs(pairs.values[:k].to(torch.float64), pairs.vectors[:k], pairs.residuals[:k])
