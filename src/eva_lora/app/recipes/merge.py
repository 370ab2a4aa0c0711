"""Fold a trained LoRA adapter into its base model and save a plain model for serving.

    eva merge --model FOLDER --task gsm8k --adapter out/run/adapter --output merged/

The base is loaded in its checkpoint's dtype (``dtype="auto"``), the adapter attached (its manifest
must name this base unless ``--force``), ``merge_and_unload`` folds ``B A`` into each weight, and
the result is written as safetensors shards (``max_shard_size``) with the tokenizer, into a
temporary folder renamed at the end. Adapters saved by ``eva train`` are plain LoRA on the original
base, PiSSA / OLoRA included (their base rewrite is converted at save time, as PEFT documents), so
the merged model is the trained one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..models import load_model, resolve_model_path
from ..run_config import RunConfig
from .runtime import require_writable

DEFAULT_SHARD = "5GB"


def check_merge_inputs(cfg: RunConfig, adapter: str | Path, output: str | Path) -> dict[str, Any]:
    """Every check that needs no model; returns the adapter's config."""
    resolve_model_path(cfg.model)
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter folder {adapter} has no adapter_config.json")
    adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(
            f"eva merge folds LoRA adapters; {adapter} is a {adapter_config.get('peft_type')} "
            "adapter"
        )
    if cfg.load_in_4bit is not None:
        raise ValueError(
            "merge into the float base: a 4-bit base cannot hold the merged weights exactly "
            "(drop --load-in-4bit)"
        )
    output = Path(output)
    require_writable(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is an existing file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not cfg.overwrite:
        raise ValueError(
            f"--output {output} already holds files: choose another folder, or pass --overwrite"
        )
    return adapter_config


def run_merge(
    cfg: RunConfig, adapter: str | Path, output: str | Path, max_shard_size: str = DEFAULT_SHARD
) -> Path:
    """Merge ``adapter`` into ``cfg.model``; save the plain model (and tokenizer) to ``output``."""
    from peft import PeftModel

    from ...model_card import check_adapter_model
    from ..tasks import get_task

    check_merge_inputs(cfg, adapter, output)
    task = get_task(cfg.task)
    base, tokenizer = load_model(
        cfg.model, task.kind, task.num_labels, seed=cfg.seed, progress=cfg.progress, keep_dtype=True
    )
    check_adapter_model(adapter, base, cfg.force)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
