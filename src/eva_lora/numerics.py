"""How the statistics compute: bounded float32 copies, pinned matmul precision, batched solves.

Three rules that every statistic follows, kept in one place:

- **Rows are cast once, in bounded chunks.** A bf16 / fp16 model hands its layers half-precision
  inputs; the statistics work in float32 (or float64). :func:`float_chunks` yields float32 copies of
  at most :data:`CHUNK_ELEMENTS` elements (64 MiB), never a float32 copy of a whole wide batch.
- **Matmul precision is pinned.** On Ampere and later GPUs PyTorch may run float32 products as TF32
  (10 mantissa bits), which a user may have switched on for training. The statistics run under
  :func:`statistics_precision`, which turns TF32 off for their own products (unless
  ``EvaConfig(statistics_tf32=True)``) and restores the user's setting afterwards.
- **Small decompositions run together, on one thread.** A check solves one small symmetric
  eigenproblem per group; :func:`batched_eigh` stacks those of equal size into one call (one launch
  and one error check on a GPU instead of one per group). On a CPU these 50-400 wide problems are
  faster on one thread than on all of them, and much faster when another process holds a core
  (``benchmarks/README.md``), so they run under :func:`single_thread`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

CHUNK_ELEMENTS = 1 << 24  # float32 elements per chunk of rows: 64 MiB


def float_chunks(
    rows: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    max_elements: int | None = None,
    shift: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """``rows`` (n, d) as ``dtype`` chunks of at most ``max_elements`` (default
    :data:`CHUNK_ELEMENTS`) elements, at least one row each; with ``shift``, each chunk is a fresh
    copy minus ``shift`` (centred in place: one copy per chunk, and the caller's rows are never
    written)."""
    limit = CHUNK_ELEMENTS if max_elements is None else max_elements
    step = max(1, limit // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        if shift is None:
            yield rows[start : start + step].to(dtype)
        else:
            chunk = rows[start : start + step].to(dtype, copy=True)
            chunk -= shift
            yield chunk


def sum_rows(chunk: torch.Tensor) -> torch.Tensor:
    """float64 column sums of a float32 chunk, without a float64 copy of it (float32 partial sums
    over at most a chunk's rows, accumulated in float64 by the caller)."""
    return chunk.sum(0).to(torch.float64)


def squared_norm(chunk: torch.Tensor) -> torch.Tensor:
    """float64 sum of squares of a chunk, without a float64 copy of it."""
    return torch.linalg.vector_norm(chunk).to(torch.float64) ** 2


def column_sum(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float64 sum over the rows of ``rows`` (n, d), read through bounded ``dtype`` chunks: a
    float64 reduction of a half-precision tensor would otherwise make a float64 copy of all of
    it."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for chunk in float_chunks(rows, dtype):
        total += sum_rows(chunk)
    return total


@contextlib.contextmanager
def statistics_precision(allow_tf32: bool = False) -> Iterator[None]:
    """float32 products at full (IEEE) precision inside, the caller's setting restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the setting TF32 is read from
        saved = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if allow_tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
        return
    saved = matmul.allow_tf32
    matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for small CPU solves (a no-op for other devices)."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def batched_eigh(matrices: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigenpairs ``(values ascending, vectors)`` of each symmetric matrix, one call per shape.

    Matrices of the same size, dtype and device are stacked and solved in one ``torch.linalg.eigh``;
    the result is in the order given. Each is symmetrised first (products in floating point are
    symmetric only up to rounding), and non-finite entries are zeroed, so that one group poisoned by
    NaN activations cannot fail the call for all: callers check finiteness (and report it)
    themselves.
    """
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(matrices)
    buckets: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        buckets.setdefault((tuple(matrix.shape), matrix.dtype, matrix.device), []).append(index)
    for (_, _, device), indices in buckets.items():
        stack = torch.stack([matrices[i] for i in indices])
        stack = torch.nan_to_num(
            0.5 * (stack + stack.transpose(-1, -2)), nan=0.0, posinf=0.0, neginf=0.0
        )
        with single_thread(device):
            values, vectors = torch.linalg.eigh(stack)
        for slot, index in enumerate(indices):
            out[index] = (values[slot], vectors[slot])
    return out  # type: ignore[return-value]


def batched_orthonormal(matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """An orthonormal basis (``Q`` of a QR) of each matrix's columns, one call per shape."""
    out: list[torch.Tensor | None] = [None] * len(matrices)
    buckets: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        buckets.setdefault((tuple(matrix.shape), matrix.dtype, matrix.device), []).append(index)
    for indices in buckets.values():
        q = torch.linalg.qr(torch.stack([matrices[i] for i in indices])).Q
        for slot, index in enumerate(indices):
            out[index] = q[slot]
    return out  # type: ignore[return-value]
