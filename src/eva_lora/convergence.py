"""When a group has converged: the variance an older estimate loses (paper Algorithm 1, line 4).

The paper stops a component once its cosine with the previous estimate reaches ``tau``. Per
component, that test punishes rotations *inside* a cluster of nearly equal eigenvalues, which cost
no explained variance at all, and a model has hundreds of groups: the loop waits for the slowest
pair of near-twins. We test what the initialisation needs instead, per group and per prefix of its
components. At each check, with ``Q_j`` the estimate of the top ``j`` components made when the group
had seen at most half of its current tokens (:meth:`ComponentTracker.reference`) and ``C`` the
current statistic,

    loss_j = 1 - trace(Q_j^T C Q_j) / (lambda_1 + ... + lambda_j)

is the share of the best ``j``-dimensional subspace's variance that the older estimate misses now.
The top ``j`` components of a group have converged when ``loss_j <= epsilon``; a group is done when
its prefix of the length the current rank allocation gives it has. ``tau`` stays the user's knob:
``epsilon = min(EPSILON_SCALE * (1 - tau^2), 1)`` (:func:`subspace_epsilon`), where ``1 - tau^2`` is
the variance a direction loses at angle ``arccos(tau)`` from its target; the scale (4) was chosen by
measurement on MiniLM and SmolLM2 (``benchmarks/README.md``): the reference holds only a quarter to
a half of the tokens, so the loss against it overstates what the current estimate still misses.
Because the reference only changes when the token count doubles, the loss grows (in expectation)
between two snapshots and groups stop right after a doubling (MiniLM: at batches 5, 11, 21, 42,
nowhere else); :data:`HALF_REFERENCE` rescales it to an exactly-half reference so that a group may
stop at any check, measured by ``benchmarks/bench_rule.py`` and not yet the default.
For the exact statistic the solver must also vouch for the estimate (relative residual below
``sqrt(1 - tau^2)``): a warm-started subspace iteration that has stalled away from the eigenvectors
would otherwise look stable.

Solvers turn a statistic into eigenpairs in two halves, so that the engine can stack the small
eigenproblems of every group into one call (:func:`eva_lora.numerics.batched_eigh`):
- :class:`SubspaceIteration` (:class:`~eva_lora.statistics.ExactStatistic`): ``request`` makes
  one product with the covariance (of the basis and of the reference estimate) and returns the
  projected matrix; ``solve`` finishes the Rayleigh-Ritz step; :func:`advance` orthonormalises the
  next bases of all groups in one batched QR.
- :class:`SketchSolver` (:class:`~eva_lora.statistics.SketchStatistic`): the sketch is its own
  eigendecomposition once :func:`~eva_lora.statistics.compress_sketches` has folded its window in.
Everything a check decides is left in device tensors; the engine reads all groups at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .numerics import batched_orthonormal
from .pca import Eigenpairs, canonical_signs, exact_eigenpairs

WARMUP_STEPS = 3
NO_REFERENCE_LOSS = 2.0  # the loss reported before a reference exists: above any epsilon (<= 1)
FINAL_SLACK = 1e-3  # relative residual of the reported components (exact statistic)
EPSILON_SCALE = 4.0  # epsilon = EPSILON_SCALE * (1 - tau^2): measured, see benchmarks/README.md
# Scale each measured loss to what it would read against an estimate on exactly half the tokens
# (:func:`half_reference_share`), so that a group may stop at any check, not only when its token
# count doubles. Measured with benchmarks/bench_rule.py; off until a default scale for it is chosen
# (the two calibration models want different ones: benchmarks/README.md, "Stops at doublings").
HALF_REFERENCE = False


def subspace_epsilon(tau: float) -> float:
    """The variance share a converged prefix may still lose between two checks, for ``tau``."""
    return min(EPSILON_SCALE * (1.0 - tau * tau), 1.0)


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
        self._product: torch.Tensor | None = None  # C @ basis of the pending request
        self._covariance: torch.Tensor | None = None  # tiny layers: the covariance itself
        self._applied_reference: torch.Tensor | None = None  # C @ reference^T
        # C @ ritz vectors, waiting for orthonormalisation
        self.next_basis: torch.Tensor | None = None

    def request(self, stats: Any, reference: torch.Tensor | None) -> torch.Tensor:
        """The symmetric matrix whose eigenpairs :meth:`solve` needs (one product with C)."""
        acc = stats.acc
        if self.m >= self.dim:  # tiny layer: the exact solve is as cheap as an iteration
            self._covariance = acc.covariance()
            if reference is not None:
                self._applied_reference = self._covariance @ reference.to(self._covariance).T
            return self._covariance
        if self.basis is None:
            self.basis = self._random_basis(acc)
        columns = (
            self.basis
            if reference is None
            else torch.cat([self.basis, reference.to(self.basis).T], 1)
        )
        product = acc.covariance_product(columns)
        self._product = product[:, : self.m]
        self._applied_reference = product[:, self.m :] if reference is not None else None
        return self.basis.T @ self._product

    def solve(self, values: torch.Tensor, vectors: torch.Tensor) -> Eigenpairs:
        """Finish the Rayleigh-Ritz step from the eigenpairs of :meth:`request`'s matrix."""
        values, vectors = values.flip(-1), vectors.flip(-1)
        if self._covariance is not None:
            self._covariance = None
            return Eigenpairs(values, canonical_signs(vectors.T), torch.zeros_like(values))
        ritz = self.basis @ vectors  # (dim, m)
        applied = self._product @ vectors  # C @ ritz
        residuals = torch.linalg.vector_norm(applied - ritz * values, dim=0)
        signed = canonical_signs(ritz.T)
        flips = (signed * ritz.T).sum(-1).sign()
        self.next_basis = applied * flips  # the power step; :func:`advance` orthonormalises it
        self._product = None
        return Eigenpairs(values, signed, residuals)

    def rayleigh_quotients(self, reference: torch.Tensor) -> torch.Tensor:
        """(k,) ``q_j^T C q_j`` of the reference estimate's rows under the current statistic."""
        applied = self._applied_reference
        self._applied_reference = None
        return (reference.to(applied) * applied.T).sum(-1)

    def final(self, stats: Any, max_iter: int | None = None) -> Eigenpairs:
        """The reported components: iterated to a relative residual of 1e-3 (the iteration of
        :func:`final_eigenpairs`, for this group alone), else solved exactly.

        An iteration costs ``d^2 m`` and a full ``eigh`` about ``10 d^3``, so wide layers (whose
        flat spectra converge slowly) get more iterations before the fallback."""
        found = None
        if self.m < self.dim and self.basis is not None:
            found = _iterate_together([self], [stats], self.k, self.basis.dtype, max_iter)[0]
        return self.exact_final(stats) if found is None else found

    def exact_final(self, stats: Any) -> Eigenpairs:
        """The top ``k`` components by a full ``eigh`` of the float64 covariance."""
        return _head(exact_eigenpairs(stats.covariance(), self.k), self.k)

    def _random_basis(self, acc: Any) -> torch.Tensor:
        """Seeded Gaussian start (no global RNG), refined by a few power steps."""
        generator = torch.Generator().manual_seed(self.seed)
        basis = torch.randn(self.dim, self.m, generator=generator, dtype=acc.moment.dtype).to(
            acc.device
        )
        for _ in range(WARMUP_STEPS):
            basis = torch.linalg.qr(acc.covariance_product(torch.linalg.qr(basis).Q)).Q
        return basis.contiguous()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.basis is None else {"basis": self.basis}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
        self.basis = state["basis"].to(device).contiguous() if "basis" in state else None


class SketchSolver:
    """The sketch holds its own eigendecomposition: a check reads its top ``k`` rows."""

    def __init__(self, k: int) -> None:
        self.k = k

    def estimate(self, stats: Any) -> Eigenpairs:
        values, rows = stats.estimate(self.k)
        return Eigenpairs(values, rows, torch.zeros_like(values))

    @staticmethod
    def rayleigh_quotients(stats: Any, reference: torch.Tensor) -> torch.Tensor:
        """(k,) ``q_j^T C q_j`` with C the sketch's ``basis diag(power) basis^T / (n - 1)``
        (:meth:`~eva_lora.statistics.SketchStatistic.current`)."""
        basis, power = stats.current()
        inner = basis.T @ reference.to(basis).T  # (size, k)
        return (inner.to(power).pow(2) * power[:, None]).sum(0) / max(stats.count - 1, 1)

    def final(self, stats: Any) -> Eigenpairs:
        return _head(stats.top(self.k), self.k)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str) -> None:
        pass


# covariances stacked for one batched final iteration, at most, above the statistics (SmolLM2's
# 90 exact groups of 576, 119 MB in all, took +204 MB of peak RSS stacked at once and copied when
# groups left the stack)
FINAL_STACK_BYTES = 64 << 20


def final_eigenpairs(solvers: Sequence[Any], stats: Sequence[Any]) -> list[Eigenpairs]:
    """Every group's reported components (:meth:`SubspaceIteration.final` and
    :meth:`SketchSolver.final`), the exact groups' iterations run together.

    One group at a time, the final iterations were ~15 small products, ``eigh`` and QR calls and a
    host read each, per group: on MiniLM 18 groups took 0.24 s, ~3 % of the plain passes, nearly all
    of it call overhead. Here the covariances of groups of one width are stacked (at most
    :data:`FINAL_STACK_BYTES` at a time, in the moment's dtype) and iterated with batched products,
    one batched ``eigh`` and QR and one host read per iteration for all of them; a group leaves the
    stack once its residuals meet :data:`FINAL_SLACK`, and one still short of it after the
    iterations gets the exact solve, as one alone would."""
    out: list[Eigenpairs | None] = [None] * len(solvers)
    buckets: dict[tuple, list[int]] = {}
    for index, (solver, stat) in enumerate(zip(solvers, stats)):
        iterative = isinstance(solver, SubspaceIteration) and solver.m < solver.dim
        if iterative and solver.basis is not None:
            key = (solver.dim, solver.m, solver.k, solver.basis.dtype, solver.basis.device)
            buckets.setdefault(key, []).append(index)
        else:
            out[index] = solver.final(stat)
    for (dim, _, k, dtype, _), indices in buckets.items():
        per_stack = max(1, FINAL_STACK_BYTES // (dim * dim * torch.finfo(dtype).bits // 8))
        for start in range(0, len(indices), per_stack):
            chunk = indices[start : start + per_stack]
            pairs = _iterate_together(
                [solvers[i] for i in chunk], [stats[i] for i in chunk], k, dtype
            )
            for index, found in zip(chunk, pairs):
                exact = found is None
                out[index] = solvers[index].exact_final(stats[index]) if exact else found
    return out  # type: ignore[return-value]


def _iterate_together(
    solvers: list[SubspaceIteration],
    stats: list[Any],
    k: int,
    dtype: torch.dtype,
    max_iter: int | None = None,
) -> list[Eigenpairs | None]:
    """Batched warm-started subspace iteration to a relative residual of :data:`FINAL_SLACK`;
    None for a group that did not get there within the iteration limit (that of
    :meth:`SubspaceIteration.final`)."""
    dim = solvers[0].dim
    if max_iter is None:
        max_iter = 30 if dim <= 2048 else 300
    covariances = torch.stack([stat.acc.covariance(dtype) for stat in stats])
    basis = torch.stack([solver.basis.to(dtype) for solver in solvers])
    waiting = list(range(len(solvers)))
    found: list[Eigenpairs | None] = [None] * len(solvers)
    tiny = torch.finfo(dtype).tiny
    for _ in range(max_iter):
        product = torch.bmm(covariances, basis)
        projected = basis.transpose(1, 2) @ product
        values, weights = torch.linalg.eigh(0.5 * (projected + projected.transpose(1, 2)))
        values, weights = values.flip(-1), weights.flip(-1)
        ritz = basis @ weights
        applied = product @ weights
        residuals = torch.linalg.vector_norm(applied - ritz * values[:, None, :], dim=1)
        met = (residuals[:, :k] <= FINAL_SLACK * values[:, :k].abs().clamp_min(tiny)).all(1)
        done = met.tolist()  # the one host read of the iteration, for every group in the stack
        for slot in (s for s, ok in enumerate(done) if ok):
            vectors = canonical_signs(ritz[slot].transpose(0, 1)[:k])
            found[waiting[slot]] = Eigenpairs(
                values[slot, :k].to(torch.float64), vectors, residuals[slot, :k]
            )
        keep = [s for s, ok in enumerate(done) if not ok]
        if not keep:
            break
        if len(keep) < len(done):
            # compacted in place (slot by slot, front to back): no second stack
            for slot, kept in enumerate(keep):
                if slot != kept:
                    covariances[slot].copy_(covariances[kept])
            covariances, applied = covariances[: len(keep)], applied[keep]
            waiting = [waiting[s] for s in keep]
        basis = torch.linalg.qr(applied).Q
    return found


def advance(solvers: list[SubspaceIteration]) -> None:
    """Orthonormalise the power step of every solver that has one: one batched QR per shape.

    contiguous: QR returns column-major Q, and a checkpointed basis comes back row-major; the same
    layout keeps a resumed run's matmuls (and so its result) bit-identical."""
    waiting = [s for s in solvers if s.next_basis is not None]
    for solver, basis in zip(waiting, batched_orthonormal([s.next_basis for s in waiting])):
        solver.basis, solver.next_basis = basis.contiguous(), None


def make_solver(kind: str, k: int, dim: int, seed: int) -> SubspaceIteration | SketchSolver:
    """The solver for a statistic kind (every rank builds one; only the group's owner calls it)."""
    if kind == "exact":
        return SubspaceIteration(k, dim, seed)
    if kind == "sketch":
        return SketchSolver(k)
    raise ValueError(f"unknown statistic kind {kind!r}")


def prefix_loss(quotients: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(k,) ``loss_j``: the share of the top-j eigenvalue sum the reference estimate misses.

    A loss <= 0 means nothing is missed. Where the top eigenvalues are all zero nothing can be
    missed, so the loss is 0, not 0 / 0."""
    best = values.to(torch.float64).cumsum(0)
    kept = quotients.to(torch.float64).cumsum(0)
    return (best - kept) / best.clamp_min(torch.finfo(torch.float64).tiny)


def half_reference_share(seen: int, tokens: int) -> float:
    """What a loss measured against an estimate on ``seen`` of ``tokens`` tokens would read
    against one on ``tokens / 2``, as a factor: ``seen / (tokens - seen)``.

    An estimate on ``m`` tokens misses about ``c / m`` of the variance its subspace should hold
    (sampling error, ``c`` a property of the data); against the current estimate on ``n`` tokens,
    which contains those ``m``, the older one reads ``c (1 / m - 1 / n)``. With ``m`` fixed that
    *grows* as ``n`` does: without this factor the loss rises between two snapshots and a group can
    only pass right after the token count doubles (measured on MiniLM: stops at batches 5, 11, 21,
    42 and nowhere else). Scaled, it reads ``c / n`` whatever the snapshot, the same as against an
    estimate on exactly half the tokens; 1 at ``seen = tokens / 2``, 1/3 at a quarter."""
    return seen / max(tokens - seen, 1)


@dataclass
class ComponentTracker:
    """One group's estimates and, after each check, which prefixes of its components have converged.

    The estimate a check is compared against is one made on at most half of the tokens seen now
    (:meth:`reference`): two snapshots are kept, taken each time the token count doubles, so the
    reference holds between a quarter and a half of the current tokens. One batch's change between
    consecutive checks would say little (a slow drift passes every step test); the change since the
    data was half as large is what the estimate still has to move, give or take the noise of the
    other half. :meth:`measure` leaves the check's numbers in a device tensor (no host read); the
    engine reads every group's numbers in one transfer and hands each its row to :meth:`decide`.
    ``converged[j]`` says whether the top ``j + 1`` components met the rule at the last check.
    """

    k: int
    solver: Any
    # (tokens, (k, dim) rows), <= 2
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    values: torch.Tensor | None = None  # (k,) eigenvalues, float64, CPU
    total_variance: float = 0.0
    loss: list[float] | None = None  # prefix losses at the last check
    converged: list[bool] = field(default_factory=list)
    checks: int = 0  # checks with an estimate so far

    def __post_init__(self) -> None:
        if len(self.converged) != self.k:
            self.converged = [False] * self.k

    def reference(self, tokens: int) -> torch.Tensor | None:
        """The newest snapshot made on at most half of ``tokens`` (None before there is one)."""
        seen = self.reference_tokens(tokens)
        return None if seen is None else dict(self.snapshots)[seen]

    def reference_tokens(self, tokens: int) -> int | None:
        """How many tokens :meth:`reference` was estimated on (None before there is one)."""
        for seen, _ in reversed(self.snapshots):
            if 2 * seen <= tokens:
                return seen
        return None

    def measure(
        self, stats: Any, pairs: Eigenpairs, trusted: torch.Tensor, reference: torch.Tensor | None
    ) -> torch.Tensor:
        """``[total variance, finite, values (k), loss (k), trusted (k)]`` of this check, on device.

        ``reference`` must be :meth:`reference` of the statistic's token count, taken before the
        solve (the exact solver multiplies it by the covariance in the same product)."""
        values = pairs.values[: self.k].to(torch.float64)
        current = pairs.vectors[: self.k].to(torch.float32)  # kept as a snapshot: float32 is plenty
        seen = self.reference_tokens(stats.count)
        if reference is None or seen is None:  # nothing to compare with yet: never converged
            loss = torch.full_like(values, NO_REFERENCE_LOSS)  # (epsilon is at most 1)
        else:
            if isinstance(self.solver, SketchSolver):
                quotients = self.solver.rayleigh_quotients(stats, reference)
            else:
                quotients = self.solver.rayleigh_quotients(reference)
            loss = prefix_loss(quotients[: values.numel()], values)
            if HALF_REFERENCE:
                loss = loss * half_reference_share(seen, stats.count)
        self.checks += 1
        if self.checks >= 2 and (not self.snapshots or stats.count >= 2 * self.snapshots[-1][0]):
            # not the first check's estimate: one batch says too little to judge the next ones by
            self.snapshots = [*self.snapshots[-1:], (stats.count, current)]
        head = torch.stack(
            [stats.total_variance().to(torch.float64), stats.is_finite().to(torch.float64)]
        )
        return torch.cat(
            [
                head.to(values.device),
                values,
                loss.to(values.device),
                trusted[: self.k].to(device=values.device, dtype=torch.float64),
            ]
        )

    def decide(self, row: list[float], epsilon: float) -> bool:
        """Take the host copy of :meth:`measure`'s numbers; True when the statistic is finite."""
        k = (len(row) - 2) // 3
        self.total_variance = row[0]
        self.values = torch.tensor(row[2 : 2 + k], dtype=torch.float64)
        self.loss = row[2 + k : 2 + 2 * k]
        trusted = True
        self.converged = []
        for loss, vouched in zip(self.loss, row[2 + 2 * k : 2 + 3 * k]):
            trusted = trusted and vouched > 0.5
            self.converged.append(trusted and loss <= epsilon)
        return row[1] > 0.5

    def check(self, stats: Any, tau: float) -> None:
        """One group's whole check: solve, measure, read back, decide.

        The engine runs these steps for all groups together (one batched solve, one read); this is
        the same sequence for a single statistic."""
        if stats.count <= self.k:  # fewer tokens than components: keep accumulating
            return
        reference = self.reference(stats.count)
        if isinstance(self.solver, SketchSolver):
            pairs, trusted = self.solver.estimate(stats), torch.ones(self.k, dtype=torch.bool)
        else:
            request = self.solver.request(stats, reference)
            pairs = self.solver.solve(*torch.linalg.eigh(_symmetric(request)))
            advance([self.solver])
            trusted = residual_certified(pairs, self.k, check_slack(tau))
        self.decide(
            self.measure(stats, pairs, trusted, reference).cpu().tolist(), subspace_epsilon(tau)
        )

    def finalize(self, stats: Any) -> Eigenpairs:
        self.total_variance = float(stats.total_variance())
        return self.solver.final(stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"solver.{k}": v for k, v in self.solver.state_dict().items()}
        for index, (seen, rows) in enumerate(self.snapshots):
            out[f"snapshot.{index}"], out[f"snapshot_tokens.{index}"] = rows, torch.tensor([seen])
        if self.values is not None:
            out["values"] = self.values
        out["checks"] = torch.tensor([self.checks])
        if self.loss is not None:
            out["loss"] = torch.tensor(self.loss, dtype=torch.float64)
        out["converged"] = torch.tensor(self.converged, dtype=torch.uint8)
        return out

    def load_state_dict(
        self, state: dict[str, torch.Tensor], total_variance: float, device: torch.device | str
    ) -> None:
        self.solver.load_state_dict(
            {k[7:]: v for k, v in state.items() if k.startswith("solver.")}, device
        )
        self.snapshots = [
            (int(state[f"snapshot_tokens.{i}"][0]), state[f"snapshot.{i}"].to(device))
            for i in range(2)
            if f"snapshot.{i}" in state
        ]
        self.values = state["values"].cpu() if "values" in state else None
        self.checks = int(state["checks"][0]) if "checks" in state else len(self.snapshots)
        self.loss = state["loss"].tolist() if "loss" in state else None
        self.converged = [bool(v) for v in state["converged"].tolist()]
        self.total_variance = total_variance


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return 0.5 * (matrix + matrix.T)


def _head(pairs: Eigenpairs, k: int) -> Eigenpairs:
    return Eigenpairs(pairs.values[:k].to(torch.float64), pairs.vectors[:k], pairs.residuals[:k])
