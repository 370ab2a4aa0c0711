"""The files eva-lora writes and reads: never half-written, never read when damaged.

Two rules, one module, used by every format (EVA state, loop checkpoint, the decision experiments'
demonstrations and policies, run outputs):

- **Writing** goes through a temporary file beside the target, fsync, then a rename
  (:func:`atomic_path`, :func:`atomic_write_text`): a crash leaves the old file or the new one,
  never half of one.
- **Paired files**: a safetensors tensor file and a JSON manifest that names its ``format``,
  ``format_version`` and the tensor file's SHA-256 (:func:`write_pair`). The tensors are written
  first and the manifest last, so the manifest's rename commits the pair; optionally the manifest
  also carries the SHA-256 of its own content, so an edited manifest is refused too.
  :func:`read_pair` refuses a missing, truncated, foreign, edited or mismatched pair with one error
  type, :class:`StateFileError`, and names the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class StateFileError(ValueError):
    """A state, checkpoint or other eva-lora file: missing, truncated, foreign or inconsistent."""


# ---- writing -------------------------------------------------------------------------------------
def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` gives under the current umask (0644 / 0755 at 022).

    Temporary files and folders are created private (0600 / 0700); a rename keeps that mode, so we
    set this one before renaming, or a colleague on a shared machine could not read the result."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, umask_mode())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def require_free_space(target: str | os.PathLike[str], needed: int, what: str) -> None:
    """Fail before any work when the file system of ``target`` cannot hold ``needed`` bytes."""
    existing = Path(target)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ValueError(
            f"not enough free space for {what} in {existing}: needs about "
            f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free"
        )


def write_pair(
    tensor_path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    manifest_path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    *,
    format_name: str,
    version: int,
    digest_key: str | None = None,
) -> dict[str, Any]:
    """Write ``tensors`` (safetensors), then the JSON manifest that commits them; returns it.

    The manifest gets ``format``, ``format_version``, ``tensor_file`` (the tensor file's name) and
    ``tensors_sha256``, then (with ``digest_key``) the SHA-256 of its own canonical content under
    that key, so that an edited manifest is refused as well."""
    tensor_path, manifest_path = Path(tensor_path), Path(manifest_path)
    with atomic_path(tensor_path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"format": format_name},
        )
    record = {
        "format": format_name,
        "format_version": version,
        "tensor_file": tensor_path.name,
        "tensors_sha256": sha256_file(tensor_path),
        **manifest,
    }
    if digest_key is not None:
        record[digest_key] = manifest_digest(record, digest_key)
    atomic_write_text(manifest_path, json.dumps(record, indent=1, allow_nan=True))
    return record


# ---- reading -------------------------------------------------------------------------------------
def read_pair(
    manifest_path: str | os.PathLike[str],
    *,
    format_name: str,
    version: int,
    what: str,
    finite: bool = True,
    digest_key: str | None = None,
    tensor_file: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors) of a pair written by :func:`write_pair`, or :class:`StateFileError`.

    The tensor file is the one the manifest names (or ``tensor_file``, for manifests older than that
    field), beside it; its SHA-256 must be the recorded one, and with ``finite`` no float tensor may
    hold NaN or Inf. With ``digest_key``, the manifest must match its own recorded SHA-256."""
    manifest_path = Path(manifest_path)
    manifest = read_json_manifest(manifest_path, format_name, version, what)
    if digest_key is not None and manifest.get(digest_key) != manifest_digest(manifest, digest_key):
        raise StateFileError(
            f"{manifest_path} does not match its own checksum (edited or corrupted)"
        )
    name = manifest.get("tensor_file", tensor_file)
    if not isinstance(name, str) or Path(name).name != name:
        raise StateFileError(f"{manifest_path} names no valid tensor file: {name!r}")
    tensor_path = manifest_path.parent / name
    if not tensor_path.is_file():
        raise StateFileError(f"{tensor_path} is missing")
    if sha256_file(tensor_path) != manifest.get("tensors_sha256"):
        raise StateFileError(
            f"{tensor_path} does not match its checksum (SHA-256) in {manifest_path.name} "
            "(truncated or replaced)"
        )
    return manifest, read_safetensors(tensor_path, finite)


def manifest_digest(manifest: Mapping[str, Any], digest_key: str) -> str:
    """SHA-256 of a manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != digest_key}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_manifest(
    path: str | os.PathLike[str], format_name: str, version: int, what: str
) -> dict[str, Any]:
    """The JSON object at ``path`` if its ``format`` and ``format_version`` are as expected."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path} not found: not {what}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{path} is not valid JSON (truncated?): {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != format_name:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise StateFileError(f"{path} is not {what} (format field is {found!r})")
    if meta.get("format_version") != version:
        raise StateFileError(
            f"{path}: unsupported format_version {meta.get('format_version')!r} "
            f"(this eva-lora reads {version})"
        )
    return meta


def read_safetensors(path: str | os.PathLike[str], finite: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; with ``finite``, float tensors must hold no NaN/Inf."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            # copies in fresh allocations (64-byte aligned, as the run's own tensors are): a view
            # of the file sits wherever the header puts it, and BLAS kernels round differently on
            # unaligned data, so a resumed run would not continue bit-identically
            tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise StateFileError(f"{path} is not a readable safetensors file: {err}") from err
    for key, tensor in tensors.items():
        if finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise StateFileError(f"{path}: tensor {key} contains NaN or Inf")
    return tensors
