"""A run's output folder knows which run it belongs to (``run.json``), and refuses the others.

Without it, ``eva train --init pissa`` into D, then ``eva train --init lora`` into D, then
``--resume`` trained on from PiSSA's checkpoint and reported "init: lora". Now:

- ``run.json`` records the settings that shape the result (:func:`shaping_settings`), the model's
  and the data's fingerprints (:mod:`eva_lora.fingerprints`). It is written before any work.
- A folder that holds another run's files is refused, unless ``resume=true`` (which continues it,
  and needs the same settings, model and data) or ``overwrite=true`` (which removes that run's
  files first). ``force=true`` resumes despite a mismatch, on purpose.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ...files import atomic_write_text
from ...fingerprints import differences

RUN_FILE = "run.json"
RUN_FORMAT, RUN_FORMAT_VERSION = "eva-lora-run", 1
# what a run writes into its folder (anything else there is the user's and is left alone)
RUN_ARTIFACTS = (RUN_FILE, "adapter", "metrics.json", "predictions.json", "eva_state", ".initial")
# settings that do not change what is trained: how it is shown, where it goes, how it resumes, how
# it is scored, and how long it goes on (a resumed run may extend max_steps / epochs)
NOT_SHAPING = (
    "resume",
    "overwrite",
    "force",
    "progress",
    "strict",
    "output_dir",
    "logging_steps",
    "save_steps",
    "eval_file",
    "eval_limit",
    "eval_batch_size",
    "max_new_tokens",
    "samples",
    "temperature",
    "max_steps",
    "epochs",
    "offload",
)


def shaping_settings(cfg: Any) -> dict[str, Any]:
    """The run's settings that a resumed run must share (JSON-ready)."""
    out = cfg.to_dict()
    for key in NOT_SHAPING:
        out.pop(key, None)
    return json.loads(json.dumps(out, default=str))


def same_settings(recorded: dict[str, Any], cfg: Any) -> bool:
    """Whether a recorded ``cfg.to_dict()`` (metrics.json's ``config``) shapes the same run as
    ``cfg``. Settings added later that do not shape a run (``overwrite``, ``force``) do not make it
    stale."""
    return {k: v for k, v in recorded.items() if k not in NOT_SHAPING} == shaping_settings(cfg)


def previous_run_files(out: Path) -> list[Path]:
    """An earlier run's files in ``out``: manifest, adapter, metrics, state, trainer checkpoints."""
    if not out.is_dir():
        return []
    found = [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
    return found + sorted(p for p in out.glob("checkpoint-*") if p.is_dir())


def check_output_folder(cfg: Any, out: Path) -> None:
    """Refuse an output folder that holds another run, before any work (see module docstring)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is an existing file, not a folder")
    previous = previous_run_files(out)
    if cfg.resume:
        if not (out / RUN_FILE).is_file() and not cfg.force:
            raise ValueError(
                f"resume: {out} has no {RUN_FILE} (not written by this version, or not a run "
                "folder): nothing to check the resumed run against; pass force=true to resume "
                "anyway"
            )
        if (out / RUN_FILE).is_file():
            recorded = read_run_manifest(out)
            changed = differences(recorded.get("settings", {}), shaping_settings(cfg))
            if changed and not cfg.force:
                raise ValueError(
                    f"resume: {out} holds a run with other settings ({'; '.join(changed[:3])}"
                    f"{'; ...' if len(changed) > 3 else ''}); resume with the same settings, use "
                    "another output_dir, overwrite=true to start afresh, or force=true to resume "
                    "anyway"
                )
        return
    if previous and not cfg.overwrite:
        raise ValueError(
            f"output_dir {out} holds another run ({', '.join(p.name for p in previous[:4])}"
            f"{', ...' if len(previous) > 4 else ''}): pass --resume to continue it, "
            "overwrite=true to replace it, or choose another output_dir"
        )


def clear_previous_run(out: Path) -> None:
    """``overwrite=true``: delete the earlier run's files (only those a run writes) first."""
    for path in previous_run_files(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def read_run_manifest(out: Path) -> dict[str, Any]:
    path = out / RUN_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable run manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not an eva-lora run manifest")
    return manifest


def check_inputs(cfg: Any, out: Path, model: dict[str, Any], data: dict[str, Any]) -> None:
    """A resumed run: model and data must be the ones the run started with (unless ``force``)."""
    if not cfg.resume or cfg.force or not (out / RUN_FILE).is_file():
        return
    recorded = read_run_manifest(out)
    changed = differences(
        {"model": recorded.get("model", {}), "data": recorded.get("data", {})},
        {"model": model, "data": data},
    )
    if changed:
        raise ValueError(
            f"resume: the run in {out} was made from another model or data "
            f"({'; '.join(changed[:3])}); "
            "resume with the same model and data, or pass force=true to resume anyway"
        )


def write_run_manifest(cfg: Any, out: Path, model: dict[str, Any], data: dict[str, Any]) -> None:
    """Record what this run is made from (kept as it is when a run resumes)."""
    if cfg.resume and (out / RUN_FILE).is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / RUN_FILE,
        json.dumps(
            {
                "format": RUN_FORMAT,
                "format_version": RUN_FORMAT_VERSION,
                "settings": shaping_settings(cfg),
                "model": model,
                "data": data,
            },
            indent=2,
        ),
    )
