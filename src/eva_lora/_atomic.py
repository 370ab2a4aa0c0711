"""Write files so that a crash never leaves a half-written one: temp file, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give under the current umask (0644 / 0755 at 022).

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
    """Fail before the work starts when the file system of ``target`` cannot hold ``needed`` bytes."""
    import shutil

    existing = Path(target)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ValueError(f"not enough free space for {what} in {existing}: needs about {needed / 2**20:.1f} MiB, "
                         f"{free / 2**20:.1f} MiB free")
