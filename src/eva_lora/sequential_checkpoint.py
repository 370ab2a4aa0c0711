"""Crash-safe sequential EVA: after each block, its finished groups and its outputs are on disk.

A run with a checkpoint folder writes, for block ``i``: the hidden states it produced
(``outputs-i/``, one safetensors file per calibration batch and ``index.json`` last) and its groups'
results (``block-i.json`` + ``block-i.safetensors``, written last: the commit). Once block ``i`` is
committed, ``outputs-(i-1)`` is removed. A resumed run checks that the calibration set, the targets
and the statistics settings are the ones recorded in ``run.json``, takes every committed block as it
is, and continues at the first unfinished one from the last committed block's outputs; the result
is the one an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .capture import LayerGroup
from .convergence import ComponentTracker
from .files import StateFileError, atomic_write_text, read_pair, write_pair
from .pca import Eigenpairs
from .planning import GroupPlan

FORMAT = "eva-lora-sequential-block"
VERSION = 1
RUN_FILE = "run.json"


def calibration_digest(calibration: list[Mapping[str, Any]]) -> str:
    """SHA-256 of the calibration batches' tensors, in order (what a resumed run must see again)."""
    digest = hashlib.sha256()
    for batch in calibration:
        for key in sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor)):
            value = batch[key].detach().to("cpu").contiguous()
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).reshape(-1).numpy().tobytes())
    return digest.hexdigest()


class BlockCheckpoint:
    """The checkpoint folder of one sequential run (see the module docstring)."""

    def __init__(self, folder: str | Path, resume: bool) -> None:
        self.folder, self.resume = Path(folder), resume

    def start(self, identity: dict[str, Any]) -> None:
        """Record what the run is (or, resuming, check it is the recorded one)."""
        run_file = self.folder / RUN_FILE
        if run_file.is_file():
            if not self.resume:
                raise ValueError(
                    f"{self.folder} holds a sequential EVA checkpoint: resume it, or choose "
                    "another folder (or remove it) to start afresh"
                )
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
            changed = sorted(k for k in identity if recorded.get(k) != identity[k])
            if changed:
                raise ValueError(
                    f"the checkpoint in {self.folder} was made for another run "
                    f"({', '.join(changed)} "
                    "differ): resume needs the same model targets, settings and calibration batches"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_file, json.dumps(identity, indent=1))

    def outputs_folder(self, index: int) -> Path:
        folder = self.folder / f"outputs-{index}"
        # a block that did not finish left it half written
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def committed(self) -> dict[int, Any]:
        """Committed block index -> its finished part (None for a block without targets)."""
        out: dict[int, Any] = {}
        for manifest in self.folder.glob("block-*.json"):
            index = int(manifest.stem.split("-")[1])
            out[index] = _read_part(manifest)
        return out

    def commit(self, index: int, part: Any, outputs_folder: Path) -> None:
        """Block ``index`` is done: outputs complete, groups written, previous outputs dropped."""
        _write_part(self.folder / f"block-{index}", part)
        shutil.rmtree(self.folder / f"outputs-{index - 1}", ignore_errors=True)


def _write_part(stem: Path, part: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for g, record in enumerate(part.groups if part is not None else []):
        final = record.final
        tensors[f"{g}.values"], tensors[f"{g}.vectors"] = final.values, final.vectors
        if final.residuals is not None:
            tensors[f"{g}.residuals"] = final.residuals
        if record.tracker.values is not None:
            tensors[f"{g}.tracker_values"] = record.tracker.values
        groups.append(
            {
                "names": record.names,
                "dim": record.layer.dim,
                "kind": record.plan.kind,
                "size": record.plan.size,
                "cap": record.cap,
                "tokens": record.tokens,
                "stop_batch": record.stop_batch,
                "finite": record.finite,
                "total_variance": record.tracker.total_variance,
                "loss": record.tracker.loss,
                "converged": record.tracker.converged,
            }
        )
    manifest = {"empty": part is None, "groups": groups}
    if part is not None:
        manifest.update(
            n_batches=part.n_batches,
            steps=part.steps,
            history=part.history,
            stop_reason=part.stop_reason,
            counts=part.capture.counts,
        )
    write_pair(
        stem.with_suffix(".safetensors"),
        tensors,
        stem.with_suffix(".json"),
        manifest,
        format_name=FORMAT,
        version=VERSION,
    )


def _read_part(manifest_path: Path) -> Any:
    from .engine import GroupRecord

    meta, tensors = read_pair(
        manifest_path,
        format_name=FORMAT,
        version=VERSION,
        what="a sequential EVA block",
        finite=False,
    )
    if meta.get("empty"):
        return None
    try:
        records = []
        for g, saved in enumerate(meta["groups"]):
            layer = LayerGroup(
                list(saved["names"]),
                int(saved["dim"]),
                torch.device("cpu"),
                active=False,
                kind=("linear", int(saved["dim"])),
            )
            tracker = ComponentTracker(
                int(saved["cap"]),
                None,
                total_variance=float(saved["total_variance"]),
                loss=saved["loss"],
                converged=list(saved["converged"]),
            )
            tracker.values = tensors.get(f"{g}.tracker_values")
            record = GroupRecord(
                layer,
                GroupPlan(saved["kind"], saved["size"], 0, 0),
                int(saved["cap"]),
                tracker,
                tokens=int(saved["tokens"]),
                finite=bool(saved["finite"]),
                stop_batch=saved["stop_batch"],
            )
            record.final = Eigenpairs(
                tensors[f"{g}.values"], tensors[f"{g}.vectors"], tensors.get(f"{g}.residuals")
            )
            records.append(record)
        return SimpleNamespace(
            groups=records,
            n_batches=int(meta["n_batches"]),
            steps=int(meta["steps"]),
            history=list(meta["history"]),
            stop_reason=str(meta["stop_reason"]),
            capture=SimpleNamespace(counts=dict(meta["counts"])),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise StateFileError(f"{manifest_path} is not a valid sequential EVA block: {err}") from err
