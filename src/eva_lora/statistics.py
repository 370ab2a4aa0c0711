"""Streaming statistics of a layer group's input rows: one interface, two kinds. Pure torch.

EVA needs, per group of layers fed the same tensor, the top principal components of every token row
it has seen, refreshed batch after batch. Two kinds of running statistic implement that:

- :class:`ExactStatistic`: the token count, the float64 sum and the ``d x d`` second moment. Exact,
  merges exactly in any order, but costs ``d^2`` memory and ``n d^2`` flops per batch: 822 MB and
  2.75x a forward pass for a Llama-3-8B ``down_proj``. Used where ``d`` is small.
- :class:`SketchStatistic`: the top ``size`` directions of the centred rows (a few times more than
  the components EVA needs), refreshed once per window of batches by a block Krylov step:
  ``O(d * size)`` memory, ``O(n * d * (size + 2 * explore))`` flops per batch, matrix products
  only while batches arrive, two small batched ``eigh`` calls for *all* sketches when a window is
  folded in (:func:`compress_sketches`, at each convergence check). Chosen by measurement
  (``benchmarks/README.md``): it captures as much of the exact PCA's variance as the incremental PCA
  it replaced (0.99+ on flat random spectra, 0.999+ on real activations at ``size = 4k``); among
  the bounded-memory candidates measured (Frequent Directions, fixed and warm-started Nystrom
  sketches, randomized range finders) only the two keep the rows' exact moment inside the kept span.

Both implement ``update(rows)`` (no host read, no decomposition), ``merge(other)``,
``total_variance()`` and ``is_finite()`` (device tensors, read by the engine once per check for
every group together), ``state_dict()`` / ``from_state_dict()`` and ``nbytes``;
:func:`eva_lora.convergence.make_solver` gives the solver that turns each kind into eigenpairs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch

from .numerics import (
    CHUNK_ELEMENTS,
    batched_eigh,
    column_sum,
    float_chunks,
    squared_norm,
    sum_rows,
)
from .pca import STATS_DTYPE, CovarianceAccumulator, Eigenpairs, canonical_signs

KINDS = ("exact", "sketch")
# new directions whose Gram eigenvalue is below this share of the largest are dependent
GRAM_FLOOR = 1e-6
# a new direction must keep this share of its norm outside the kept basis
NEW_DIRECTION_FLOOR = 1e-3


class Statistic(ABC):
    """A mergeable, checkpointable running summary of the rows ``(n, dim)`` one group has seen."""

    kind: ClassVar[str]
    dim: int

    @property
    @abstractmethod
    def count(self) -> int:
        """Rows seen so far."""

    @abstractmethod
    def update(self, rows: torch.Tensor) -> None:
        """Add rows ``(n, dim)`` of any float dtype."""

    @abstractmethod
    def merge(self, other: Statistic) -> None:
        """Add the rows another statistic of the same kind has seen (another process's, say)."""

    @abstractmethod
    def total_variance(self) -> torch.Tensor:
        """trace of the covariance of every row seen (a 0-dim float64 tensor on the statistic's
        device): the denominator of the explained variance ratio."""

    @abstractmethod
    def is_finite(self) -> torch.Tensor:
        """0-dim bool tensor: False once a NaN or Inf row has entered."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held between batches (what a process must keep for this group)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that describe the statistic completely (safetensors-ready)."""


class ExactStatistic(Statistic):
    """Exact second moment (see :class:`~eva_lora.pca.CovarianceAccumulator`).

    Solved by subspace iteration."""

    kind = "exact"

    def __init__(
        self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        self.acc = CovarianceAccumulator(dim, device, dtype)
        self.dim = dim

    @property
    def count(self) -> int:
        return self.acc.count

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def update(self, rows: torch.Tensor) -> None:
        self.acc.update(rows)

    def merge(self, other: Statistic) -> None:
        if not isinstance(other, ExactStatistic):
            raise TypeError(f"cannot merge a {other.kind} statistic into an exact one")
        self.acc.merge(other.acc)

    def total_variance(self) -> torch.Tensor:
        return self.acc.total_variance()

    def covariance(self) -> torch.Tensor:
        return self.acc.covariance()

    def is_finite(self) -> torch.Tensor:
        return self.acc.is_finite()

    @property
    def nbytes(self) -> int:
        return exact_bytes(self.dim, self.acc.moment.element_size())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.acc.state_dict()

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> ExactStatistic:
        acc = CovarianceAccumulator.from_state_dict(state, device)
        out = cls.__new__(cls)
        out.acc, out.dim = acc, acc.dim
        return out


class SketchStatistic(Statistic):
    """Bounded-memory PCA: an orthonormal ``basis`` (dim, <= size) of the directions that matter so
    far and ``power``, the centred sum of squares of every row seen along each of them, largest
    first.

    Rows arrive in *windows*: the batches between two calls of :func:`compress_sketches` (the
    engine calls it at each convergence check, so by default a window is one batch). The first
    batch of an *exploring* window picks ``2 * explore`` new directions: ``G = X^T Phi`` (random
    combinations of its centred rows, so they lie where the data are) and ``A G`` (one power step on
    the current statistic ``A``), both made orthogonal to the basis. Every batch of the window then
    adds ``W^T W`` with ``W = X K``, ``K = [basis, G, A G]``: the exact second moment of its rows
    inside ``span(K)``. Nothing in a batch is a decomposition or reads a value back to the host: two
    to four matrix products per chunk of rows.

    Exploring costs about three times what absorbing the rows into the basis alone does. With
    ``explore_every = e > 1`` (the engine's setting for a group that has converged but is still fed)
    an exploring window of one batch alternates with a *refining* window of ``e - 1`` batches whose
    ``K`` is the basis and the shift of the mean only: its rows refine the kept directions (a
    rotation inside their span at the fold) at the cost of one product of width ``size``.

    At the end of a window the new statistic, restricted to ``span(K)``, is known exactly: the old
    ``basis diag(power) basis^T``, the window's centred moment and the rank-one correction for the
    shift between the old mean and the window's (scikit-learn's incremental-PCA algebra). Its top
    ``size`` eigenvectors (a Rayleigh-Ritz step) become the new basis. This is a block Krylov step
    per window: as good as the incremental PCA it replaces (which absorbed rows 128 at a time, with
    one decomposition and six host reads per chunk) at the same size, on flat spectra too
    (``benchmarks/README.md``). Only directions outside ``span(K)`` are lost; ``discarded`` is that
    energy (sum of squares not represented by ``power``).

    count, mean and the total sum of squares are exact, so the total variance (the denominator of
    the explained variance ratio) is exact whatever the truncation.
    """

    kind = "sketch"

    def __init__(
        self,
        dim: int,
        size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        explore: int | None = None,
        seed: int = 0,
        explore_every: int = 1,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if size < 1:
            raise ValueError(f"sketch size must be >= 1, got {size}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sketch dtype must be float32 or float64, got {dtype}")
        if explore_every < 1:
            raise ValueError(f"explore_every must be >= 1, got {explore_every}")
        self.dim = dim
        self.explore_every = explore_every
        # whether the open (or else the last) window explores: its K holds new directions
        self.window_explores = True
        self.size = min(size, dim)
        self.explore = default_explore(self.size) if explore is None else max(1, explore)
        self.dtype = dtype
        self.seed = seed
        self.windows = 0  # windows folded in so far: seeds the next window's random combinations
        self._count = 0
        self.mean = torch.zeros(dim, dtype=STATS_DTYPE, device=device)
        self.sq_dist = torch.zeros((), dtype=STATS_DTYPE, device=device)  # sum of ||x - mean||^2
        self.basis = torch.zeros(dim, 0, dtype=dtype, device=device)
        self.power = torch.zeros(0, dtype=STATS_DTYPE, device=device)
        if self.size == dim:  # room for every direction: the identity basis makes the sketch exact
            self.basis = torch.eye(dim, dtype=dtype, device=device)
            self.power = torch.zeros(dim, dtype=STATS_DTYPE, device=device)
        self._close_window()

    # ---- the running window -------------------------------------------------------------------
    def _close_window(self) -> None:
        self.shift: torch.Tensor | None = None  # (dim,) float64: the window's first batch mean
        self.extra: torch.Tensor | None = None  # (dim, e): new directions, orthogonal to the basis
        self.moment: torch.Tensor | None = None  # (m, m) float64: sum of W^T W, W = (x - shift) K
        self.window_sum: torch.Tensor | None = None  # (dim,) float64: sum of (x - shift)
        self.window_sq: torch.Tensor | None = None  # () float64: sum of ||x - shift||^2
        self.window_count = 0
        self.window_batches_seen = 0
        self._transform: torch.Tensor | None = None

    @property
    def pending(self) -> bool:
        """Rows have arrived since the last :func:`compress_sketches`."""
        return self.window_count > 0

    @property
    def window_due(self) -> bool:
        """The open window has absorbed its batches (one when exploring, ``explore_every - 1``
        when refining): the next check folds it, so that the batch after opens the next kind."""
        length = 1 if self.window_explores else self.explore_every - 1
        return self.pending and self.window_batches_seen >= length

    def _explores_next(self) -> bool:
        """Whether the next window explores: always with ``explore_every`` 1 or while the basis
        is not full (new directions are what fills it); otherwise after each refining window."""
        if self.explore_every <= 1 or self.basis.shape[1] < self.size:
            return True
        return not self.window_explores

    @property
    def count(self) -> int:
        return self._count + self.window_count

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        rows = rows.detach().to(self.device)
        opened = None
        if not self.pending:
            self.window_explores = self._explores_next()
            opened = self._open_window(rows) if self.window_explores else self._open_refining(rows)
        if opened is not None:  # the opening batch's centred rows and X [G, basis], reused
            x, head = opened
            width = head.shape[1] - self.basis.shape[1]
            self._absorb(
                x, torch.cat([head[:, width:], head[:, :width], x @ self.extra[:, width:]], 1)
            )
        else:
            for x in float_chunks(rows, self.dtype, shift=self.shift.to(self.dtype)):
                self._absorb(x, torch.cat([x @ self.basis, x @ self.extra], 1))
        self.window_count += rows.shape[0]
        self.window_batches_seen += 1

    def _absorb(self, x: torch.Tensor, in_k: torch.Tensor) -> None:
        """Add centred rows ``x`` whose coordinates in ``K = [basis, extra]`` are ``in_k``."""
        self.moment += (in_k.T @ in_k).to(STATS_DTYPE)
        self.window_sum += sum_rows(x)
        self.window_sq += squared_norm(x)

    def _explore_width(self) -> int:
        """The next window's new directions of each kind: enough to fill an empty basis at once."""
        kept = self.basis.shape[1]
        width = max(self.explore, -(-(self.size - kept) // 2))
        return max(0, min(width, (self.dim - kept) // 2))

    def _open_window(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The window's new directions, from its first batch ``X`` (centred on its own mean):
        ``G = X^T Phi`` (random combinations of rows), ``A G`` and ``A basis`` (one power step, the
        directions the kept subspace is turning towards) and the shift of the mean. All are made
        orthogonal to the basis; their own orthonormalisation waits for
        :func:`compress_sketches`.

        When the rows fit one chunk (:func:`~eva_lora.numerics.float_chunks`), they are cast and
        centred once, and ``(X, X [G, basis])`` is returned for :meth:`update` to absorb the batch
        without computing the products again; None otherwise (wider batches are read in chunks
        for each product)."""
        centred = self._set_shift(rows)
        single = centred is not None

        def chunks() -> Iterator[torch.Tensor]:
            if single:
                yield centred
            else:
                yield from float_chunks(rows, self.dtype, shift=self.shift.to(self.dtype))

        width = self._explore_width()
        generator = torch.Generator(device=self.device).manual_seed(
            self.seed * 1_000_003 + self.windows
        )
        mixing = torch.randn(
            rows.shape[0], width, generator=generator, dtype=self.dtype, device=self.device
        )
        guide = torch.zeros(self.dim, width, dtype=self.dtype, device=self.device)
        start = 0
        for x in chunks():
            guide.addmm_(x.T, mixing[start : start + x.shape[0]])
            start += x.shape[0]
        guide = self._new_directions(guide)
        kept = self.basis.shape[1]
        probe = torch.cat([guide, self.basis], 1)  # A [G, basis]: rows times both, in one pass
        powered = torch.zeros_like(probe)
        head = None
        for x in chunks():
            head = x @ probe
            powered.addmm_(x.T, head)
        parts = [guide, self._new_directions(powered)]
        if kept:  # the shift between the old mean and this window's: a direction of its own
            parts.append(self._new_directions((self.mean - self.shift).to(self.dtype)[:, None]))
        self._start_window(torch.cat(parts, 1))
        return (centred, head) if single else None

    def _open_refining(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A window without new directions: ``K`` is the basis and the shift between the old mean
        and this window's (so that the fold stays exact). Same return as :meth:`_open_window`,
        with ``X basis`` as the product reused."""
        centred = self._set_shift(rows)
        self._start_window(self._new_directions((self.mean - self.shift).to(self.dtype)[:, None]))
        return None if centred is None else (centred, centred @ self.basis)

    def _set_shift(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Set the window's shift (its first batch's mean); return the rows cast and centred
        when they fit one chunk (:func:`~eva_lora.numerics.float_chunks`), else None."""
        if rows.shape[0] * self.dim > CHUNK_ELEMENTS:
            self.shift = column_sum(rows, self.dtype) / rows.shape[0]
            return None
        centred = rows.to(self.dtype, copy=True)
        self.shift = sum_rows(centred) / rows.shape[0]
        centred -= self.shift.to(self.dtype)
        return centred

    def _start_window(self, extra: torch.Tensor) -> None:
        self.extra = extra
        m = self.basis.shape[1] + extra.shape[1]
        self.moment = torch.zeros(m, m, dtype=STATS_DTYPE, device=self.device)
        self.window_sum = torch.zeros(self.dim, dtype=STATS_DTYPE, device=self.device)
        self.window_sq = torch.zeros((), dtype=STATS_DTYPE, device=self.device)

    def _orthogonal(self, columns: torch.Tensor, passes: int = 2) -> torch.Tensor:
        """``columns`` minus their part in span(basis), projected twice ("twice is enough")."""
        for _ in range(passes if self.basis.shape[1] else 0):
            columns = columns - self.basis @ (self.basis.T @ columns)
        return columns

    def _new_directions(self, columns: torch.Tensor) -> torch.Tensor:
        """Unit columns orthogonal to the basis; a column (almost) inside span(basis) becomes zero.

        Normalising what is left of such a column would blow its rounding error, which lies
        partly inside span(basis), up to a unit vector: the basis and the new directions would no
        longer be orthogonal, which the window's algebra assumes."""
        before = torch.linalg.vector_norm(columns, dim=0)
        left = self._orthogonal(columns)
        after = torch.linalg.vector_norm(left, dim=0)
        keep = after > NEW_DIRECTION_FLOOR * before
        left = torch.where(
            keep, left / after.clamp_min(torch.finfo(left.dtype).tiny), torch.zeros_like(left)
        )
        return _unit_columns(self._orthogonal(left, passes=1))

    # ---- folding a window in (called through compress_sketches) -------------------------------
    def _extra_gram(self) -> torch.Tensor:
        extra = self.extra.to(STATS_DTYPE)
        return extra.T @ extra

    def _set_transform(self, gram_values: torch.Tensor, gram_vectors: torch.Tensor) -> None:
        """``R`` (e, e): ``extra @ R`` orthonormalises the window's new directions, dropping
        numerically dependent ones (their columns of ``R`` are zero). Fixed for the window's
        life, so a window that stays open over several checks solves it once."""
        keep = gram_values > gram_values.max().clamp_min(torch.finfo(STATS_DTYPE).tiny) * GRAM_FLOOR
        scale = torch.where(
            keep,
            gram_values.clamp_min(torch.finfo(STATS_DTYPE).tiny).rsqrt(),
            torch.zeros_like(gram_values),
        )
        self._transform = gram_vectors * scale

    def _projected_moment(self) -> torch.Tensor:
        """The window's statistic in an orthonormal basis of span(K): ``R^T H R`` (``R`` keeps the
        basis and orthonormalises the new directions, :meth:`_set_transform`)."""
        kept = self.basis.shape[1]
        moment = self._window_moment()
        out = torch.empty_like(moment)
        out[:kept, :kept] = moment[:kept, :kept]
        out[:kept, kept:] = moment[:kept, kept:] @ self._transform
        out[kept:, :kept] = out[:kept, kept:].T
        out[kept:, kept:] = self._transform.T @ moment[kept:, kept:] @ self._transform
        return out

    def _window_moment(self) -> torch.Tensor:
        """K^T A K for the statistic after the window: old part + centred window + mean shift."""
        n_old, n_new = self._count, self.window_count
        total = n_old + n_new
        projected_sum = self._in_k(self.window_sum)
        moment = self.moment - torch.outer(projected_sum, projected_sum) / n_new
        if n_old:
            kept = self.basis.shape[1]
            # basis orthonormal, extra orthogonal to it
            moment[:kept, :kept] += torch.diag(self.power)
            shift = self._in_k(self.mean - (self.shift + self.window_sum / n_new))
            moment += (n_old * n_new / total) * torch.outer(shift, shift)
        return moment

    def _in_k(self, vector: torch.Tensor) -> torch.Tensor:
        """K^T v for a float64 vector (products in the statistic's dtype)."""
        v = vector.to(self.dtype)
        return torch.cat([self.basis.T @ v, self.extra.T @ v]).to(STATS_DTYPE)

    def _rotated(self, vectors: torch.Tensor) -> torch.Tensor:
        """``K R vectors``: directions given in the window's orthonormal coordinates, in R^dim."""
        kept = self.basis.shape[1]
        new_dirs = self.extra @ self._transform.to(self.dtype)
        out = self.basis @ vectors[:kept].to(self.dtype)
        return out.addmm_(new_dirs, vectors[kept:].to(self.dtype))

    def _after_window(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean, centred sum of squares) of every row, the open window's included."""
        n_old, n_new = self._count, self.window_count
        if not n_new:
            return n_old, self.mean, self.sq_dist
        total = n_old + n_new
        window_mean = self.shift + self.window_sum / n_new
        window_sq = self.window_sq - self.window_sum.dot(self.window_sum) / n_new
        if not n_old:
            return total, window_mean, window_sq
        shift = self.mean - window_mean
        sq_dist = self.sq_dist + window_sq + (n_old * n_new / total) * shift.dot(shift)
        return total, self.mean + (window_mean - self.mean) * (n_new / total), sq_dist

    def _finish_window(self, values: torch.Tensor, vectors: torch.Tensor) -> None:
        values, vectors = values.flip(0)[: self.size], vectors.flip(1)[:, : self.size]
        basis = self._rotated(vectors)
        self._count, self.mean, self.sq_dist = self._after_window()
        self.basis, self.power = basis.contiguous(), values.clamp_min(0)
        self.windows += 1
        self._close_window()

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(basis, power) of every row seen so far, the open window folded in first.

        The engine only reads groups it judges, and a judged group's window (one batch long) is
        due at every check and folded there anyway; a converged group's longer window is not read
        until the end."""
        if self.pending:
            self.compress()
        return self.basis, self.power

    def compress(self) -> None:
        """Fold the pending window in (one sketch; the engine folds all of them together)."""
        compress_sketches([self])

    # ---- reading ------------------------------------------------------------------------------
    @property
    def discarded(self) -> torch.Tensor:
        """Centred sum of squares the kept directions do not hold (the truncation's loss)."""
        return self.sq_dist - self.power.sum()

    def estimate(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, rows): the current top ``k`` covariance eigenvalues and directions.

        No decomposition: the basis is orthonormal up to rounding; :meth:`top` re-orthonormalises
        for the final answer. An open window is folded in first."""
        basis, power = self.current()
        k = min(k, basis.shape[1])
        return power[:k] / max(self.count - 1, 1), basis[:, :k].T

    def top(self, k: int) -> Eigenpairs:
        """Top ``k`` components (orthonormal rows, canonical signs) and covariance eigenvalues."""
        if self.pending:
            self.compress()
        if self._count < 2:
            raise ValueError(f"need at least 2 rows, have {self._count}")
        basis, power = self.basis[:, :k].to(STATS_DTYPE), self.power[:k]
        # rows span fewer than k directions: complete with zero-variance ones
        if basis.shape[1] < k:
            filler = torch.randn(
                self.dim,
                k - basis.shape[1],
                generator=torch.Generator().manual_seed(0),
                dtype=STATS_DTYPE,
            ).to(self.device)
            basis = torch.cat([basis, filler], 1)
            power = torch.cat([power, power.new_zeros(k - power.numel())])
        q, r = torch.linalg.qr(basis)
        vectors = canonical_signs(
            (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).T
        )
        values = power / (self._count - 1)
        return Eigenpairs(values, vectors, torch.zeros_like(values))

    def total_variance(self) -> torch.Tensor:
        count, _, sq_dist = self._after_window()  # exact, open window or not: no fold needed
        if count < 2:
            raise ValueError(f"need at least 2 rows, have {count}")
        return sq_dist / (count - 1)

    def is_finite(self) -> torch.Tensor:
        finite = torch.isfinite(self.mean).all() & torch.isfinite(self.sq_dist)
        if self.pending:
            finite = finite & torch.isfinite(self.window_sum).all()
        return finite

    def merge(self, other: Statistic) -> None:
        """Absorb another sketch: its ``basis diag(power) basis^T`` and mean enter as one window."""
        if not isinstance(other, SketchStatistic):
            raise TypeError(f"cannot merge a {other.kind} statistic into a sketch")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge sketches of width {other.dim} and {self.dim}")
        compress_sketches([self, other])
        if other.count == 0:
            return
        basis, power = other.basis.to(self.device, self.dtype), other.power.to(self.device)
        if self._count == 0:
            self.mean, self.sq_dist = (
                other.mean.to(self.device).clone(),
                other.sq_dist.to(self.device).clone(),
            )
            self.basis, self.power, self._count = basis.clone(), power.clone(), other.count
            return
        self.shift = other.mean.to(self.device).clone()
        self.extra = self._new_directions(basis)
        # K^T basis_other
        in_k = torch.cat([self.basis.T @ basis, self.extra.T @ basis]).to(STATS_DTYPE)
        self.moment = in_k @ (power[:, None] * in_k.T)
        self.window_sum = torch.zeros(self.dim, dtype=STATS_DTYPE, device=self.device)
        self.window_sq = other.sq_dist.to(self.device).clone()
        self.window_count = other.count
        self.compress()

    @property
    def nbytes(self) -> int:
        return sketch_bytes(
            self.dim, self.size, torch.empty(0, dtype=self.dtype).element_size(), self.explore
        )

    # ---- files ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {
            "count": torch.tensor(
                [
                    self._count,
                    self.window_count,
                    self.window_batches_seen,
                    int(self.window_explores),
                ],
                dtype=torch.int64,
            ),
            "size": torch.tensor(
                [self.size, self.explore, self.seed, self.windows, self.explore_every],
                dtype=torch.int64,
            ),
            "mean": self.mean.cpu(),
            "scalars": self.sq_dist.reshape(1).cpu(),
            "basis": self.basis.cpu().contiguous(),
            "power": self.power.cpu(),
        }
        if self.pending:
            out.update(
                {
                    "window.shift": self.shift.cpu(),
                    "window.extra": self.extra.cpu().contiguous(),
                    "window.moment": self.moment.cpu(),
                    "window.sum": self.window_sum.cpu(),
                    "window.sq": self.window_sq.reshape(1).cpu(),
                }
            )
        return out

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> SketchStatistic:
        dim = int(state["mean"].shape[0])
        # files written before windows could span batches hold 4 sizes and 2 counts, before
        # refining windows 3 counts (every window explored)
        sizes = [int(v) for v in state["size"].reshape(-1)[:5]] + [1]
        size, explore, seed, windows, explore_every = sizes[:5]
        out = cls(dim, size, device, state["basis"].dtype, explore, seed, explore_every)
        basis, power = state["basis"], state["power"]
        if (
            basis.ndim != 2
            or basis.shape[0] != dim
            or power.shape != (basis.shape[1],)
            or basis.shape[1] > out.size
        ):
            raise ValueError(
                f"inconsistent sketch shapes for width {dim}: basis {tuple(basis.shape)}, "
                f"power {tuple(power.shape)}"
            )
        counts = [int(v) for v in state["count"].reshape(-1)[:4]]
        if min(counts) < 0:
            raise ValueError(f"sketch count must be >= 0, got {counts}")
        out._count, out.windows = counts[0], windows
        out.mean = state["mean"].to(device, STATS_DTYPE)
        out.sq_dist = state["scalars"].reshape(-1)[0].to(device, STATS_DTYPE)
        out.basis = basis.to(device).contiguous()
        out.power = power.to(device, STATS_DTYPE)
        if counts[1]:
            extra = state["window.extra"]
            m = basis.shape[1] + extra.shape[1]
            if extra.shape[0] != dim or tuple(state["window.moment"].shape) != (m, m):
                raise ValueError(f"inconsistent sketch window shapes for width {dim}")
            out.shift = state["window.shift"].to(device, STATS_DTYPE)
            out.extra = extra.to(device).contiguous()
            out.moment = state["window.moment"].to(device, STATS_DTYPE)
            out.window_sum = state["window.sum"].to(device, STATS_DTYPE)
            out.window_sq = state["window.sq"].reshape(-1)[0].to(device, STATS_DTYPE)
            out.window_count = counts[1]
            out.window_batches_seen = counts[2] if len(counts) > 2 else 1
        out.window_explores = bool(counts[3]) if len(counts) > 3 else True
        return out


def compress_sketches(sketches: Sequence[SketchStatistic]) -> None:
    """Fold every pending window in: two batched ``eigh`` calls for all the sketches together.

    One call orthonormalises each window's new directions (their small Gram matrix), the other
    solves the statistic restricted to the window's span; sketches of equal size share each call.
    """
    pending = [s for s in sketches if s.pending]
    for sketch, (values, vectors) in zip(pending, _restricted_eigh(pending)):
        sketch._finish_window(values, vectors)


def _restricted_eigh(
    pending: Sequence[SketchStatistic],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigenpairs of each pending window's statistic in the window's orthonormal coordinates."""
    fresh = [s for s in pending if s._transform is None]
    for sketch, pair in zip(fresh, batched_eigh([s._extra_gram() for s in fresh])):
        sketch._set_transform(*pair)
    return batched_eigh([s._projected_moment() for s in pending])


def default_explore(size: int) -> int:
    """New directions of each kind a window adds: an eighth of the sketch (at least 8)."""
    return max(8, size // 8)


def _unit_columns(columns: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(columns, dim=0)
    return columns / norms.clamp_min(torch.finfo(columns.dtype).tiny)


def exact_bytes(dim: int, element_size: int = 4) -> int:
    """Bytes of an exact statistic: the (dim, dim) moment plus two float64 vectors."""
    return dim * dim * element_size + 2 * 8 * dim


def sketch_bytes(dim: int, size: int, element_size: int = 4, explore: int | None = None) -> int:
    """Bytes a sketch holds while a window is open: the (dim, size) basis, the window's new
    directions (G, A G: 2 * explore; A basis: size; the mean shift: 1) and its (m, m) float64
    moment, the float64 mean and power."""
    size = min(size, dim)
    extra = 2 * (default_explore(size) if explore is None else explore) + size + 1
    return (size + extra) * dim * element_size + 8 * (dim + size + (size + extra) ** 2)


def sketch_update_bytes(
    dim: int, size: int, explore: int | None = None, element_size: int = 4
) -> int:
    """Extra bytes while a window is folded in: the new basis and the float64 copies of the new
    directions. Only one group folds at a time, so a process needs this once, not once per group."""
    size = min(size, dim)
    extra = 2 * (default_explore(size) if explore is None else explore) + size + 1
    return size * dim * element_size + 8 * extra * dim


def statistic_from_state_dict(
    kind: str, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> Statistic:
    """Rebuild a statistic of ``kind`` from :meth:`Statistic.state_dict` output."""
    if kind == "exact":
        return ExactStatistic.from_state_dict(state, device)
    if kind == "sketch":
        return SketchStatistic.from_state_dict(state, device)
    raise ValueError(f"unknown statistic kind {kind!r}; known: {KINDS}")
