"""Compute and save an EVA state for a model and a task's training data (the SVD precompute step).

    eva init --model minilm --task sst2 --output out/eva_state eva.rho=2
    eva init ... --checkpoint-every 20            # crash-safe; after a kill: the same command + --resume
"""

from __future__ import annotations

import time
from pathlib import Path

from ...checkpoint import has_snapshot
from ...engine import compute_eva_state
from ...state import EvaState
from ..models import check_max_length, load_model, resolve_model_path
from ..preprocess import Collator, init_batches, tokenize
from ..run_config import RunConfig
from ..tasks import get_task
from .runtime import device, init_distributed, require_writable


def run_init(cfg: RunConfig, output: str | Path, checkpoint_every: int = 0,
             resume: bool = False) -> tuple[EvaState, float]:
    """(state, seconds): EVA over the task's training data in batches of ``svd_batch_size``; saved to ``output``.

    With ``checkpoint_every`` the statistics are checkpointed to ``<output>.ckpt``; ``resume``
    continues from there (the batches are the same seeded sequence, so the result is the same).
    """
    task = get_task(cfg.task)
    resolve_model_path(cfg.model)
    output = Path(output)
    require_writable(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is an existing file, not a state folder")
    checkpoint = output.with_name(output.name + ".ckpt")
    if resume and not has_snapshot(checkpoint):
        raise ValueError(f"--resume: no checkpoint in {checkpoint}; run without --resume to start")
    if not resume and not cfg.overwrite and output.is_dir() and any(output.iterdir()):
        raise ValueError(f"--output {output} already holds a state (or other files): choose another folder, "
                         "or pass --overwrite to replace it")
    check_max_length(cfg)
    rank, world_size = init_distributed()
    data = task.load("train", cfg.data_dir, cfg.train_file, cfg.train_limit)
    model, tokenizer = load_model(cfg.model, task.kind, task.num_labels, cfg.bf16, cfg.seed, cfg.progress)
    model.to(device())
    prepared = tokenize(data, tokenizer, task.kind, cfg.max_length, cfg.drop_long)
    batches = init_batches(prepared.dataset, Collator(tokenizer.pad_token_id), cfg.svd_batch_size, cfg.seed,
                           shard=(rank, world_size))
    start = time.perf_counter()
    from ...checkpoint import checkpoint_bytes
    from ...files import require_free_space
    from ...state import state_bytes
    from ...targets import find_target_layers, in_features

    widths = [in_features(m) for m in find_target_layers(model, cfg.eva).values()]
    needed = state_bytes(widths, cfg.eva.max_components)
    if checkpoint_every:
        needed += checkpoint_bytes(widths, cfg.eva)
    require_free_space(output, needed, "the EVA state" + (" and its checkpoints" if checkpoint_every else ""))
    state = compute_eva_state(model, batches, cfg.eva, checkpoint_dir=checkpoint if checkpoint_every or resume
                              else None, checkpoint_every=checkpoint_every, resume=resume,
                              progress=cfg.progress and rank == 0, strict=cfg.strict)
    seconds = time.perf_counter() - start
    if rank == 0:  # every rank holds the same state; one writes it
        state.save(output)
    return state, seconds
