"""Convergence of each group's top components, batch after batch (paper Algorithm 1, line 4).

A component has converged when its |cosine| with the previous estimate is >= tau *and* the solver
can certify the new estimate (its residual is small next to its eigen-gap). The second condition
matters because a warm-started iterative solver that has not moved would otherwise look "stable".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pca import CovarianceAccumulator, Eigenpairs, component_cosine, exact_eigenpairs, rayleigh_ritz


def oversampled(k: int, dim: int) -> int:
    """Block size of the iterative solver: k wanted components plus a margin that speeds it up."""
    return min(dim, k + max(8, k // 2))


def residual_certified(pairs: Eigenpairs, k: int, slack: float) -> torch.Tensor:
    """(k,) bool: ``||C v_j - theta_j v_j|| <= slack * theta_j``.

    A warm-started iterate that has stalled away from an eigenvector keeps a large residual, so
    a small relative residual is what makes "the estimate stopped moving" mean "it converged".
    """
    scale = pairs.values[:k].abs().clamp_min(torch.finfo(pairs.values.dtype).tiny)
    return pairs.residuals[:k] <= slack * scale


@dataclass
class ComponentTracker:
    """Latest estimate and convergence flags of one group's ``k`` components.

    The solver is a subspace iteration that advances one power step per check and is
    warm-started from the previous check: a check costs one product with the covariance.
    """

    k: int
    dim: int
    seed: int = 0
    basis: torch.Tensor | None = None  # (dim, m) orthonormal columns
    previous: torch.Tensor | None = None  # (k, dim) last estimate
    values: torch.Tensor | None = None  # (k,) eigenvalues
    total_variance: float = 0.0
    converged: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        self.converged = torch.zeros(self.k, dtype=torch.bool)
        self.m = oversampled(self.k, self.dim)

    def check(self, stats: CovarianceAccumulator, tau: float) -> None:
        """Re-solve from the current statistics and update which components have converged."""
        if stats.count <= self.k:  # fewer tokens than components: keep accumulating
            return
        pairs = self._solve(stats)
        trusted = residual_certified(pairs, self.k, check_slack(tau)).cpu()
        if self.previous is not None:
            cosine = component_cosine(self.previous, pairs.vectors[: self.k]).cpu()
            self.converged = (cosine >= tau) & trusted
        self.previous = pairs.vectors[: self.k]
        self.values = pairs.values[: self.k].to(torch.float64)
        self.total_variance = stats.total_variance()

    def finalize(self, stats: CovarianceAccumulator, max_iter: int = 30) -> Eigenpairs:
        """The reported components: iterated to a relative residual of 1e-3, else solved exactly."""
        self.total_variance = stats.total_variance()
        for _ in range(max_iter if self.basis is not None else 0):
            pairs = self._solve(stats)
            if bool(residual_certified(pairs, self.k, FINAL_SLACK).all()):
                return _head(pairs, self.k)
        return _head(exact_eigenpairs(stats.covariance(), self.k), self.k)

    def _solve(self, stats: CovarianceAccumulator) -> Eigenpairs:
        if self.m >= self.dim:  # tiny layer: the exact solve is as cheap as an iteration
            return exact_eigenpairs(stats.covariance(), self.m)
        if self.basis is None:
            self.basis = self._random_basis(stats)
        pairs, applied = rayleigh_ritz(stats.covariance_product(self.basis), self.basis)
        # contiguous: QR returns column-major Q, and a checkpointed basis comes back row-major; the
        # same layout keeps a resumed run's matmuls (and so its result) bit-identical.
        self.basis = torch.linalg.qr(applied).Q.contiguous()
        return pairs

    def _random_basis(self, stats: CovarianceAccumulator) -> torch.Tensor:
        """Seeded Gaussian start (no global RNG), refined by a few power steps."""
        generator = torch.Generator().manual_seed(self.seed)
        basis = torch.randn(self.dim, self.m, generator=generator, dtype=stats.moment.dtype).to(stats.device)
        for _ in range(WARMUP_STEPS):
            basis = torch.linalg.qr(stats.covariance_product(torch.linalg.qr(basis).Q)).Q
        return basis.contiguous()


WARMUP_STEPS = 3
FINAL_SLACK = 1e-3  # relative residual of the reported components


def _head(pairs: Eigenpairs, k: int) -> Eigenpairs:
    return Eigenpairs(pairs.values[:k].to(torch.float64), pairs.vectors[:k], pairs.residuals[:k])


def check_slack(tau: float) -> float:
    """Relative residual allowed at a check: the sine of the angle that tau tolerates."""
    return max((1.0 - tau * tau) ** 0.5, 1e-3)
