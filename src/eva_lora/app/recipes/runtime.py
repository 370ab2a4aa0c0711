"""What the recipes share about where they run: process group, device, output dir, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ...distributed import default_timeout, world


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun / accelerate launch describe in the environment (if any).

    Done before the model exists so that EVA's statistics are computed collectively; transformers'
    Trainer then reuses the same group for DDP. Returns (rank, world_size).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=default_timeout())
    return world()


def device() -> torch.device:
    """This process's accelerator (cuda:LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def require_writable(out: Path) -> None:
    """Fail before any work when the output folder (or its nearest existing parent) is read-only."""
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output folder {out} is not writable")


def check_output_file(path: Path) -> None:
    """A file the command will write at the end: refuse, before any work, a folder in its place or a
    folder it cannot be written to (the work would be lost at the last step)."""
    if path.is_dir():
        raise ValueError(f"output {path} is a folder, expected a file path")
    require_writable(path.parent if path.parent != Path("") else Path("."))
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"output {path} is not writable")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The Trainer checkpoint with the highest step in ``output_dir`` (None if there is none)."""
    found = [
        p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None
