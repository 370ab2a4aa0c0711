"""Streaming statistics of a layer group's input rows: one interface, two kinds. Pure torch.

EVA needs, per group of layers fed the same tensor, the top principal components of every token row
it has seen, refreshed batch after batch. Two kinds of running statistic implement that:

- :class:`ExactStatistic`: the token count, the float64 sum and the ``d x d`` second moment. Exact,
  merges exactly in any order, but costs ``d^2`` memory and ``n d^2`` flops per batch: 822 MB and
  2.75x a forward pass for a Llama-3-8B ``down_proj``. Used where ``d`` is small.
- :class:`SketchStatistic`: an incremental PCA (scikit-learn's ``IncrementalPCA`` update, in Gram
  form) that keeps the top ``size`` directions of the centred rows, a few times more than the
  components EVA needs. ``O(d * size)`` memory, ``O(n * d * size)`` flops per batch, one small
  ``eigh`` per chunk of ``size`` rows. Chosen by measurement (``benchmarks/README.md``): on real
  activations it captures >= 0.9995 of the exact PCA's variance at ``size = 4k``; among the
  bounded-memory candidates we measured (Frequent Directions, a fixed Nystrom sketch, randomized
  warm-started range finders) it loses least on flat spectra, because every chunk enters exactly
  and only the truncation to ``size`` directions forgets.

Both implement ``update(rows)``, ``merge(other)``, ``total_variance()``, ``state_dict()`` /
``from_state_dict()`` and ``nbytes``; :func:`eva_lora.convergence.make_solver` gives the solver that
turns each kind into eigenpairs at a convergence check.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .pca import STATS_DTYPE, CovarianceAccumulator, Eigenpairs, canonical_signs

KINDS = ("exact", "sketch")


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
    def total_variance(self) -> float:
        """trace of the covariance of every row seen: the denominator of the explained variance ratio."""

    @abstractmethod
    def is_finite(self) -> bool:
        """False once a NaN or Inf row has entered."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held between batches (what a process must keep for this group)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that describe the statistic completely (safetensors-ready)."""


class ExactStatistic(Statistic):
    """Exact second moment (see :class:`~eva_lora.pca.CovarianceAccumulator`), solved by subspace iteration."""

    kind = "exact"

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
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

    def total_variance(self) -> float:
        return self.acc.total_variance()

    def covariance(self) -> torch.Tensor:
        return self.acc.covariance()

    def is_finite(self) -> bool:
        return self.acc.is_finite()

    @property
    def nbytes(self) -> int:
        return exact_bytes(self.dim, self.acc.moment.element_size())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.acc.state_dict()

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> ExactStatistic:
        acc = CovarianceAccumulator.from_state_dict(state, device)
        out = cls.__new__(cls)
        out.acc, out.dim = acc, acc.dim
        return out



class SketchStatistic(Statistic):
    """Incremental PCA of the centred rows that keeps the top ``size`` directions (bounded memory).

    State: the row count, the float64 mean, the float64 sum of squared distances to the mean (so the
    total variance, and with it the explained variance ratio, stays exact), and the low-rank part:
    ``basis`` (dim, <= size) orthonormal columns with ``power`` (<= size,) the sum of squares of the
    centred rows along each column, largest first.

    An update takes rows in chunks of ``chunk`` rows. With ``S = diag(sqrt(power)) basis^T`` the
    centred data seen so far in compressed form, ``X`` the chunk centred on its own mean and ``c``
    scikit-learn's mean-correction row ``sqrt(n m / (n + m)) (mean - chunk mean)``, the new state is
    the top ``size`` right-singular pairs of ``M = [S; X; c]``, found from the small Gram matrix
    ``M M^T`` (float64 ``eigh``) so that the ``d``-wide work is four matrix products. ``discarded``
    accumulates the squared singular values dropped by the truncation (the sketch's only loss).
    """

    kind = "sketch"

    def __init__(self, dim: int, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 chunk: int | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if size < 1:
            raise ValueError(f"sketch size must be >= 1, got {size}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sketch dtype must be float32 or float64, got {dtype}")
        self.dim = dim
        self.size = min(size, dim)
        self.chunk = max(1, chunk if chunk is not None else self.size)
        self.dtype = dtype
        self._count = 0
        self.mean = torch.zeros(dim, dtype=STATS_DTYPE, device=device)
        self.sq_dist = 0.0  # sum over rows of ||x - mean||^2, float64
        self.basis = torch.zeros(dim, 0, dtype=dtype, device=device)
        self.power = torch.zeros(0, dtype=STATS_DTYPE, device=device)
        self.discarded = 0.0

    @property
    def count(self) -> int:
        return self._count

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (n, {self.dim}), got {tuple(rows.shape)}")
        rows = rows.to(device=self.device, dtype=self.dtype)
        for part in rows.split(self.chunk):
            mean = part.mean(0, dtype=STATS_DTYPE)
            centred = part - mean.to(self.dtype)
            sq = float(torch.linalg.vector_norm(centred, dtype=STATS_DTYPE)) ** 2  # no float64 copy of the chunk
            self._absorb(centred, part.shape[0], mean, sq)

    def merge(self, other: Statistic) -> None:
        """Absorb another sketch: its compressed rows ``diag(sqrt(power)) basis^T`` enter like a chunk."""
        if not isinstance(other, SketchStatistic):
            raise TypeError(f"cannot merge a {other.kind} statistic into a sketch")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge sketches of width {other.dim} and {self.dim}")
        if other.count == 0:
            return
        rows = (other.basis.to(self.device, self.dtype) * other.power.sqrt().to(self.device, self.dtype)).T
        self._absorb(rows, other.count, other.mean.to(self.device), other.sq_dist)
        self.discarded += other.discarded

    def _absorb(self, centred: torch.Tensor, n_new: int, mean_new: torch.Tensor, sq_new: float) -> None:
        """Fold ``n_new`` rows, given as centred rows (or any rows with the same Gram), into the state.

        The Gram matrix of ``M = [S; X; c]`` is assembled block by block (no stacked copy of M), and
        the new basis is one product plus one in-place ``addmm_``: the only d-wide temporaries are
        the chunk itself and the new basis.
        """
        if n_new == 0:
            return
        n_old = self._count
        total = n_old + n_new
        corr = None  # scikit-learn's mean-correction row, once there is an old mean to correct
        if n_old:
            shift = self.mean - mean_new
            corr = (math.sqrt(n_old * n_new / total) * shift).to(self.dtype).unsqueeze(0)  # (1, dim)
            self.sq_dist += sq_new + n_old * n_new / total * float(shift.pow(2).sum())
        else:
            self.sq_dist = sq_new
        scale = self.power.sqrt()  # (kept,)
        kept, rows = scale.numel(), centred.shape[0]
        extra = 0 if corr is None else 1
        size = kept + rows + extra
        gram = torch.empty(size, size, dtype=STATS_DTYPE, device=self.device)
        gram[:kept, :kept] = torch.diag(self.power)
        projected = (centred @ self.basis).to(STATS_DTYPE) * scale  # (rows, kept): X S^T
        gram[kept : kept + rows, :kept] = projected
        gram[:kept, kept : kept + rows] = projected.T
        gram[kept : kept + rows, kept : kept + rows] = (centred @ centred.T).to(STATS_DTYPE)
        if corr is not None:
            corr_proj = (corr @ self.basis).to(STATS_DTYPE) * scale  # (1, kept)
            corr_rows = (centred @ corr.T).to(STATS_DTYPE)  # (rows, 1)
            gram[-1, :kept], gram[:kept, -1] = corr_proj[0], corr_proj[0]
            gram[kept : kept + rows, -1], gram[-1, kept : kept + rows] = corr_rows[:, 0], corr_rows[:, 0]
            gram[-1, -1] = float((corr.to(STATS_DTYPE) ** 2).sum())
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0), vectors.flip(1)
        keep = int(min(self.size, (values > values[0].clamp_min(0) * 1e-12).sum()))
        self.discarded += float(values[keep:].clamp_min(0).sum())
        values, vectors = values[:keep], vectors[:, :keep]
        inv = values.rsqrt()
        top = (vectors[:kept] * scale.unsqueeze(1) * inv).to(self.dtype)
        middle = (vectors[kept : kept + rows] * inv).to(self.dtype)
        basis = self.basis @ top  # contiguous (dim, keep): a resumed run multiplies the same layout
        basis.addmm_(centred.T, middle)
        if corr is not None:
            basis.addmm_(corr.T, (vectors[-1:] * inv).to(self.dtype))
        self.basis = basis
        self.power = values
        self.mean = self.mean + (mean_new - self.mean) * (n_new / total)
        self._count = total

    def top(self, k: int) -> Eigenpairs:
        """The top ``k`` components (rows, canonical signs) and covariance eigenvalues of the sketch."""
        if self._count < 2:
            raise ValueError(f"need at least 2 rows, have {self._count}")
        basis, power = self.basis[:, :k].to(STATS_DTYPE), self.power[:k]
        if basis.shape[1] < k:  # rows span fewer than k directions: complete with zero-variance ones
            filler = torch.randn(self.dim, k - basis.shape[1], generator=torch.Generator().manual_seed(0),
                                 dtype=STATS_DTYPE).to(self.device)
            basis = torch.linalg.qr(torch.cat([basis, filler], 1)).Q
            power = torch.cat([power, power.new_zeros(k - power.numel())])
        vectors = canonical_signs(basis.T)
        values = power / (self._count - 1)
        return Eigenpairs(values, vectors, torch.zeros_like(values))

    def total_variance(self) -> float:
        if self._count < 2:
            raise ValueError(f"need at least 2 rows, have {self._count}")
        return self.sq_dist / (self._count - 1)

    def is_finite(self) -> bool:
        return math.isfinite(self.sq_dist) and bool(torch.isfinite(self.mean).all())

    @property
    def nbytes(self) -> int:
        return sketch_bytes(self.dim, self.size, torch.empty(0, dtype=self.dtype).element_size())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "count": torch.tensor([self._count], dtype=torch.int64),
            "size": torch.tensor([self.size, self.chunk], dtype=torch.int64),
            "mean": self.mean.cpu(),
            "scalars": torch.tensor([self.sq_dist, self.discarded], dtype=STATS_DTYPE),
            "basis": self.basis.cpu().contiguous(),
            "power": self.power.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> SketchStatistic:
        dim = int(state["mean"].shape[0])
        size, chunk = (int(v) for v in state["size"].reshape(-1)[:2])
        out = cls(dim, size, device, state["basis"].dtype, chunk)
        basis, power = state["basis"], state["power"]
        if basis.ndim != 2 or basis.shape[0] != dim or power.shape != (basis.shape[1],) or basis.shape[1] > out.size:
            raise ValueError(f"inconsistent sketch shapes for width {dim}: basis {tuple(basis.shape)}, "
                             f"power {tuple(power.shape)}")
        out._count = int(state["count"].reshape(-1)[0])
        if out._count < 0:
            raise ValueError(f"sketch count must be >= 0, got {out._count}")
        out.mean = state["mean"].to(device, STATS_DTYPE)
        out.sq_dist, out.discarded = (float(v) for v in state["scalars"].reshape(-1)[:2])
        out.basis = basis.to(device).contiguous()
        out.power = power.to(device, STATS_DTYPE)
        return out


def exact_bytes(dim: int, element_size: int = 4) -> int:
    """Bytes of an exact statistic: the (dim, dim) moment plus two float64 vectors."""
    return dim * dim * element_size + 2 * 8 * dim


def sketch_bytes(dim: int, size: int, element_size: int = 4) -> int:
    """Bytes a sketch holds between batches: the (dim, size) basis, the float64 mean and power."""
    size = min(size, dim)
    return size * dim * element_size + 8 * (dim + size)


def sketch_update_bytes(dim: int, size: int, chunk: int | None = None, element_size: int = 4) -> int:
    """Extra bytes while a sketch absorbs a chunk: the new basis, the chunk's rows and the Gram matrix.
    Only one group updates at a time, so a process needs this once, not once per group."""
    size = min(size, dim)
    chunk = chunk if chunk is not None else size
    return (size + chunk + 1) * dim * element_size + 8 * (size + chunk + 1) ** 2


def statistic_from_state_dict(kind: str, state: dict[str, torch.Tensor],
                              device: torch.device | str = "cpu") -> Statistic:
    """Rebuild a statistic of ``kind`` from :meth:`Statistic.state_dict` output."""
    if kind == "exact":
        return ExactStatistic.from_state_dict(state, device)
    if kind == "sketch":
        return SketchStatistic.from_state_dict(state, device)
    raise ValueError(f"unknown statistic kind {kind!r}; known: {KINDS}")
