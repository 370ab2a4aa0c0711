"""Compute and save an EVA state for a model and a task's training data (the SVD precompute step).

    eva init --model minilm --task sst2 --output out/eva_state eva.rho=2
    # crash-safe; after a kill: the same command + --resume
    eva init ... --checkpoint-every 20
    # block by block, weights read from FOLDER as needed
    eva init --model FOLDER --task gsm8k --sequential
    # every finished block committed; after a kill: + --resume
    eva init ... --sequential --checkpoint-every 1
    # on a bitsandbytes NF4 base (QLoRA)
    eva init --model FOLDER --task gsm8k --load-in-4bit

See :func:`run_init` for checkpoints, resuming and the ready adapter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import has_snapshot
from ...engine import compute_eva_state
from ...fingerprints import model_fingerprint
from ...model_card import save_ready_adapter
from ...sequential import SequentialOptions
from ...sequential_checkpoint import RUN_FILE as SEQUENTIAL_RUN_FILE
from ...state import EvaState
from ..models import (
    check_max_length,
    is_quantized,
    load_model,
    quantization_options,
    resolve_model_path,
)
from ..preprocess import Collator, init_batches, tokenize
from ..run_config import RunConfig
from ..tasks import get_task
from .runtime import device, init_distributed, require_writable


def run_init(
    cfg: RunConfig,
    output: str | Path,
    checkpoint_every: int = 0,
    resume: bool = False,
    adapter_out: str | Path | None = None,
) -> tuple[EvaState, float]:
    """(state, seconds): EVA over the task's training data, saved to ``output``.

    The data is read in batches of ``svd_batch_size``. With ``checkpoint_every`` the statistics are
    checkpointed to ``<output>.ckpt``; ``resume`` continues from there (the batches are the same
    seeded sequence, so the result is the same).

    ``adapter_out``: also write a ready, untrained PEFT adapter there (A = the components, B = 0),
    which any LoRA trainer can continue from
    (``PeftModel.from_pretrained(base, dir, is_trainable=True)``).
    """
    task = get_task(cfg.task)
    resolve_model_path(cfg.model)
    output = Path(output)
    require_writable(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is an existing file, not a state folder")
    checkpoint = output.with_name(output.name + ".ckpt")
    if resume and not (has_snapshot(checkpoint) or (checkpoint / SEQUENTIAL_RUN_FILE).is_file()):
        raise ValueError(f"--resume: no checkpoint in {checkpoint}; run without --resume to start")
    if not resume and not cfg.overwrite and output.is_dir() and any(output.iterdir()):
        raise ValueError(
            f"--output {output} already holds a state (or other files): choose another folder, "
            "or pass --overwrite to replace it"
        )
    if adapter_out is not None:
        adapter_out = Path(adapter_out)
        require_writable(adapter_out)
        if adapter_out.exists() and not adapter_out.is_dir():
            raise ValueError(f"--adapter-out {adapter_out} is an existing file, not a folder")
        if not (cfg.overwrite or resume) and adapter_out.is_dir() and any(adapter_out.iterdir()):
            raise ValueError(
                f"--adapter-out {adapter_out} already holds files: choose another folder, pass "
                "--overwrite to replace it, or --no-adapter"
            )
    check_max_length(cfg)
    rank, world_size = init_distributed()
    data = task.load("train", cfg.data_dir, cfg.train_file, cfg.train_limit)
    model, tokenizer, weights = _load(cfg, task)
    prepared = tokenize(data, tokenizer, task.kind, cfg.max_length, cfg.drop_long)
    batches = init_batches(
        prepared.dataset,
        Collator(tokenizer.pad_token_id),
        cfg.svd_batch_size,
        cfg.seed,
        shard=(rank, world_size),
    )
    start = time.perf_counter()
    from ...checkpoint import checkpoint_bytes
    from ...files import require_free_space
    from ...state import state_bytes
    from ...targets import find_target_layers, in_features

    widths = [in_features(m) for m in find_target_layers(model, cfg.eva).values()]
    needed = state_bytes(widths, cfg.eva.max_components)
    if checkpoint_every:
        needed += checkpoint_bytes(widths, cfg.eva)
    require_free_space(
        output, needed, "the EVA state" + (" and its checkpoints" if checkpoint_every else "")
    )
    sequential = False
    if cfg.sequential:
        if world_size > 1:
            raise ValueError("--sequential runs in one process: start it without torchrun")
        sequential = SequentialOptions(
            offload=cfg.offload,
            blocks=cfg.blocks,
            device=device(),
            weights=weights,
            checkpoint_dir=checkpoint if checkpoint_every or resume else None,
            resume=resume,
        )
        # sequential: a commit after every block (sequential_checkpoint.py)
        checkpoint_every, resume = 0, False
    state = compute_eva_state(
        model,
        batches,
        cfg.eva,
        checkpoint_dir=checkpoint if checkpoint_every or resume else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=cfg.progress and rank == 0,
        strict=cfg.strict,
        sequential=sequential,
    )
    seconds = time.perf_counter() - start
    if rank == 0:  # every rank holds the same state; one writes it
        state.save(output)
        if adapter_out is not None:
            save_ready_adapter(
                model,
                state,
                adapter_out,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                task_type="CAUSAL_LM" if task.kind == "generation" else "SEQ_CLS",
                info={
                    "base_model": cfg.model,
                    "task": cfg.task,
                    "init": "eva (untrained)",
                    "seed": cfg.seed,
                    "steps": 0,
                },
                fingerprint=None if weights is not None else model_fingerprint(model),
            )
    return state, seconds


def ready_adapter_path(output: Path) -> Path:
    """Where ``eva init`` puts the untrained adapter by default: beside the state folder."""
    return output.with_name(output.name + "_adapter")


def _load(cfg: RunConfig, task: Any) -> tuple[Any, Any, Any]:
    """(model, tokenizer, weights on disk or None). Sequential mode on a safetensors folder (float,
    or saved in 4 bits by bitsandbytes) builds the model without its weights (read block by block
    later; with ``--load-in-4bit`` a float block is quantised as it is read); otherwise the model is
    loaded whole and placed on this process's device (a 4-bit base is placed at load time)."""
    from ...disk_weights import empty_model_from_folder, reads_block_by_block

    path = resolve_model_path(cfg.model)
    if cfg.sequential and path.is_dir() and reads_block_by_block(path):
        from transformers import AutoTokenizer

        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        quantization_options(
            cfg.load_in_4bit, dtype
        )  # the CLI's one line if bitsandbytes is absent
        model, weights = empty_model_from_folder(path, dtype, task.kind, cfg.load_in_4bit)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
        return model, tokenizer, weights
    model, tokenizer = load_model(
        cfg.model, task.kind, task.num_labels, cfg.bf16, cfg.seed, cfg.progress, cfg.load_in_4bit
    )
    if not is_quantized(model):
        model.to(device())
    return model, tokenizer, None
