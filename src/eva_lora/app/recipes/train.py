"""Fine-tune with LoRA from any registered initialisation; write a PEFT adapter and metrics.json.

    eva train --task sst2 --init eva train_limit=512 max_steps=60
    eva train --preset math --model path/to/llama --init eva-dora

Order of work: validate everything (task, init, model folder, data files, resume checkpoint,
output folder: a folder holding another run is refused, see :mod:`.run_folder`) before any file is
written; record the run in ``run.json``; tokenise; initialise the adapters (EVA computes or loads
its state on the SVD batch size) before the optimiser exists; train with transformers' Trainer;
save the adapter and metrics atomically.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...files import atomic_write_text, require_free_space
from ...fingerprints import data_fingerprint, model_fingerprint
from ...model_card import NO_EMBEDDING_COPY, save_adapter
from ...state import STATE_DIR, EvaState
from ..initializers import InitMethod, LoraSettings, build_peft_model, get_init_method
from ..models import (
    check_max_length,
    is_quantized,
    load_model,
    quantization_options,
    resolve_model_path,
)
from ..preprocess import Collator, init_batches, tokenize
from ..run_config import RunConfig
from ..tasks import eval_tasks, get_task
from ..tasks.base import split_validation
from .evaluate import evaluate_all
from .run_folder import check_inputs, check_output_folder, clear_previous_run, write_run_manifest
from .runtime import device, init_distributed, latest_checkpoint, require_writable

ADAPTER_DIR, METRICS_FILE, PREDICTIONS_FILE = "adapter", "metrics.json", "predictions.json"


def validate(cfg: RunConfig, evaluate: bool = True) -> Path | None:
    """Checks that need no model (a ValueError names the problem); returns the resume checkpoint."""
    task = get_task(cfg.task)
    method = get_init_method(cfg.init)
    resolve_model_path(cfg.model)
    source = _train_source(cfg, task)
    if not source.exists():
        raise ValueError(f"task {task.name}: training data not found: {source}")
    if evaluate and cfg.eval_file is None and not cfg.validation:
        for each in eval_tasks(cfg.task):
            if not each.path("eval", cfg.data_dir).exists():
                raise ValueError(
                    f"task {each.name}: evaluation data not found: "
                    f"{each.path('eval', cfg.data_dir)}"
                )
    if cfg.eva_state is not None and method.eva is None:
        raise ValueError(f"eva_state is only used by the EVA inits, not by {method.name}")
    if cfg.sequential:
        raise ValueError(
            "sequential applies to eva init: compute the state there (eva init --sequential), then "
            "train with --eva-state"
        )
    if cfg.load_in_4bit is not None:
        if method.weight_changing:
            raise ValueError(
                f"init {method.name} rewrites the base weights, which a 4-bit base cannot hold: "
                "use eva, lora or another init that leaves the base as it is, "
                "or drop --load-in-4bit"
            )
        # bitsandbytes missing: one line, before any work
        quantization_options(cfg.load_in_4bit, torch.float32)
    out = Path(cfg.output_dir)
    checkpoint = None
    if cfg.resume:
        checkpoint = latest_checkpoint(out) if out.is_dir() else None
        if checkpoint is None:
            raise ValueError(
                f"resume: no checkpoint-<step> folder in {out}; run without resume to start"
            )
    require_writable(out)
    check_output_folder(cfg, out)
    check_max_length(cfg)
    return checkpoint


@dataclass
class Setup:
    """What :func:`prepare` gives the later phases: the run's task, data, model, output folder."""

    task: Any
    method: InitMethod
    out: Path
    checkpoint: Path | None  # the trainer checkpoint a resumed run continues from
    rank: int
    world_size: int
    model: Any
    tokenizer: Any
    data: Any  # preprocess.Prepared: the tokenised training set and what was dropped / truncated
    collator: Collator
    settings: LoraSettings
    model_fingerprint: dict[str, Any]  # of the base model as loaded (before an init rewrote it)


@dataclass
class Initialised:
    """What :func:`initialise` gives: the PEFT model, its EVA state (EVA inits), the initial adapter
    (inits that rewrite the base weights) and the seconds it took."""

    peft_model: Any
    state: EvaState | None
    initial: Path | None
    seconds: float


@dataclass
class Fitted:
    trainer: Any
    result: Any
    seconds: float


def train(
    cfg: RunConfig, evaluate: bool = True, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """Run one fine-tuning (see the module docstring); returns the metrics written to metrics.json.

    Four phases: :func:`prepare` (checks, data, model), :func:`initialise` (the adapter's init, EVA
    included), :func:`fit` (the trainer) and :func:`report` (adapter, metrics, evaluation).
    Under torchrun / accelerate launch: EVA is computed once, collectively (each rank feeds its
    share of the initialisation batches), training is DDP, and only rank 0 writes files and
    evaluates.
    """
    run = prepare(cfg, evaluate)
    init = initialise(cfg, run)
    fitted = fit(cfg, run, init, callbacks)
    if run.rank != 0:
        return {"rank": run.rank, "steps": fitted.trainer.state.global_step}
    return report(cfg, run, init, fitted, evaluate)


def prepare(cfg: RunConfig, evaluate: bool = True) -> Setup:
    """Check everything that needs no model, then load the data and the model and tokenise."""
    checkpoint = validate(cfg, evaluate)
    rank, world_size = init_distributed()
    task, method, out = get_task(cfg.task), get_init_method(cfg.init), Path(cfg.output_dir)
    data = task.load("train", cfg.data_dir, cfg.train_file, cfg.train_limit)
    if cfg.validation:
        data, _ = split_validation(data, cfg.validation)
    model, tokenizer = load_model(
        cfg.model, task.kind, task.num_labels, cfg.bf16, cfg.seed, cfg.progress, cfg.load_in_4bit
    )
    # before any init
    fingerprints = model_fingerprint(model), data_fingerprint(_train_source(cfg, task))
    check_inputs(cfg, out, *fingerprints)
    if is_quantized(model):  # QLoRA: placed at load time; PEFT's preparation for k-bit training
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device())
    prepared = tokenize(data, tokenizer, task.kind, cfg.max_length, cfg.drop_long)
    settings = LoraSettings(
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        task_type="CAUSAL_LM" if task.kind == "generation" else "SEQ_CLS",
        total_steps=_total_steps(cfg, prepared.kept),
    )
    # adapter + trainer checkpoints (LoRA weights and Adam
    # moments: ~2% of the model) + 64 MiB margin
    require_free_space(
        out,
        4 * sum(p.numel() for p in model.parameters()) // 50 + (64 << 20),
        "the adapter and checkpoints",
    )
    if rank == 0:
        if cfg.overwrite and not cfg.resume:
            clear_previous_run(out)
        write_run_manifest(cfg, out, *fingerprints)
    return Setup(
        task=task,
        method=method,
        out=out,
        checkpoint=checkpoint,
        rank=rank,
        world_size=world_size,
        model=model,
        tokenizer=tokenizer,
        data=prepared,
        collator=Collator(tokenizer.pad_token_id),
        settings=settings,
        model_fingerprint=fingerprints[0],
    )


def initialise(cfg: RunConfig, run: Setup) -> Initialised:
    """Build the PEFT model with its init (computing EVA, or reusing a given or earlier state)."""
    state = _existing_state(cfg, run.out)
    start = time.perf_counter()
    limit = run.method.batch_limit(cfg.calibration_batches)

    def batches():
        return init_batches(
            run.data.dataset,
            run.collator,
            cfg.svd_batch_size,
            cfg.seed,
            limit,
            shard=(run.rank, run.world_size),
        )

    peft_model, state = build_peft_model(
        run.model,
        run.method,
        run.settings,
        cfg.eva,
        batches=batches,
        eva_state=state,
        progress=cfg.progress and run.rank == 0,
        strict=cfg.strict,
        force=cfg.force,
    )
    seconds = time.perf_counter() - start
    run.out.mkdir(parents=True, exist_ok=True)
    # the state was read from there: keep it as it is
    reused = cfg.resume and (run.out / STATE_DIR).is_dir()
    if run.rank == 0 and state is not None and not reused:
        # replaces a previous run's state: the folder must describe this adapter
        state.save(run.out / STATE_DIR)
    initial = (
        _save_initial(peft_model, run.out) if run.method.weight_changing and run.rank == 0 else None
    )
    return Initialised(peft_model=peft_model, state=state, initial=initial, seconds=seconds)


def fit(
    cfg: RunConfig, run: Setup, init: Initialised, callbacks: list[Any] | None = None
) -> Fitted:
    """Train with transformers' Trainer (resuming from the checkpoint :func:`prepare` found)."""
    checkpoints_without_embedding_copies(init.peft_model)
    trainer = _trainer(
        init.peft_model,
        run.tokenizer,
        run.data.dataset,
        run.collator,
        cfg,
        run.method.callbacks(init.peft_model) + list(callbacks or []),
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(run.checkpoint) if run.checkpoint else None)
    return Fitted(trainer=trainer, result=result, seconds=time.perf_counter() - start)


def report(
    cfg: RunConfig, run: Setup, init: Initialised, fitted: Fitted, evaluate: bool = True
) -> dict[str, Any]:
    """Save the adapter (with card and state), evaluate, write metrics.json; return the metrics."""
    trainer, loss = fitted.trainer, round(float(fitted.result.training_loss), 6)
    _save_adapter(
        init.peft_model,
        run.out / ADAPTER_DIR,
        init.initial,
        init.state,
        {
            "base_model": cfg.model,
            "task": cfg.task,
            "init": cfg.init,
            "seed": cfg.seed,
            "steps": trainer.state.global_step,
            "train_loss": loss,
        },
        run.model_fingerprint,
    )
    state, data = init.state, run.data
    metrics = {
        "task": cfg.task,
        "init": cfg.init,
        "model": cfg.model,
        "seed": cfg.seed,
        "init_seconds": round(init.seconds, 3),
        "train_seconds": round(fitted.seconds, 3),
        "train_loss": loss,
        "steps": trainer.state.global_step,
        "examples": data.kept,
        "dropped_long": data.dropped,
        "truncated_long": data.truncated,
        "trainable_parameters": sum(
            p.numel() for p in init.peft_model.parameters() if p.requires_grad
        ),
        "log": [
            {k: v for k, v in e.items() if k in ("step", "loss", "grad_norm", "learning_rate")}
            for e in trainer.state.log_history
            if "loss" in e
        ],
        "eva": None
        if state is None
        else {"n_batches": state.n_batches, "stop_reason": state.stop_reason, "ranks": state.ranks},
        "world_size": run.world_size,
        "config": cfg.to_dict(),
    }
    if evaluate:
        start = time.perf_counter()
        items: dict[str, Any] = {}
        metrics["eval"] = evaluate_all(init.peft_model, run.tokenizer, cfg, items)
        metrics["eval_seconds"] = round(time.perf_counter() - start, 3)
        # before metrics.json, which marks the run finished
        atomic_write_text(run.out / PREDICTIONS_FILE, json.dumps(items, default=str))
    atomic_write_text(run.out / METRICS_FILE, json.dumps(metrics, indent=2, default=str))
    return metrics


class StepLines:
    """A transformers TrainerCallback that prints one line per logging step: step, loss, grad norm.

    For runs that want visible progress without a redrawn bar (logs, the demo)."""

    def __new__(cls, label: str, stream: Any = None):
        from transformers import TrainerCallback

        class _Lines(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    extra = f", grad norm {logs['grad_norm']:.3f}" if "grad_norm" in logs else ""
                    print(
                        f"  [{label}] step {state.global_step}/{state.max_steps}: loss "
                        f"{logs['loss']:.4f}{extra}",
                        file=stream or sys.stderr,
                        flush=True,
                    )

        return _Lines()


def _train_source(cfg: RunConfig, task: Any) -> Path:
    return Path(cfg.train_file) if cfg.train_file else task.path("train", cfg.data_dir)


def _total_steps(cfg: RunConfig, examples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(examples / (cfg.batch_size * cfg.grad_accum)) * math.ceil(cfg.epochs))


def _existing_state(cfg: RunConfig, out: Path) -> EvaState | None:
    """A state given by the user, or the one a resumed run computed before (never recomputed)."""
    if cfg.eva_state is not None:
        return EvaState.load(cfg.eva_state)
    if cfg.resume and (out / STATE_DIR).is_dir() and get_init_method(cfg.init).eva is not None:
        return EvaState.load(out / STATE_DIR)
    return None


def checkpoints_without_embedding_copies(peft_model: Any) -> None:
    """The Trainer saves checkpoints with ``save_pretrained(dir, state_dict=...)``, i.e. with PEFT's
    defaults: make ours (``NO_EMBEDDING_COPY``) this model's default, so that a checkpoint is not a
    copy of the embeddings either. A caller's explicit ``save_embedding_layers`` still wins."""
    peft_model.save_pretrained = functools.partial(
        type(peft_model).save_pretrained, peft_model, **NO_EMBEDDING_COPY
    )


def _trainer(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    collator: Collator,
    cfg: RunConfig,
    callbacks: list[Any],
) -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        bf16=cfg.bf16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        label_names=["labels"],
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks
    )
    if not cfg.progress:  # quiet runs: no bar, and no log dict printed per step either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _save_initial(peft_model: Any, out: Path) -> Path:
    """PiSSA-like inits change W; keep the initial adapter to turn the final one into plain LoRA."""
    initial = out / ".initial" / "initial_adapter"  # PEFT names the loaded adapter after the folder
    shutil.rmtree(initial.parent, ignore_errors=True)
    config = peft_model.peft_config["default"]
    init_value = config.init_lora_weights
    config.init_lora_weights = True  # PEFT's documented trick: saved as a plain adapter
    peft_model.save_pretrained(initial, **NO_EMBEDDING_COPY)
    config.init_lora_weights = init_value
    return initial


def _save_adapter(
    peft_model: Any,
    target: Path,
    initial: Path | None,
    state: EvaState | None = None,
    info: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> None:
    """The adapter, its model card and EVA state, swapped in atomically (see
    ``eva_lora.model_card``). PiSSA-like adapters are converted against the saved initial adapter,
    which is removed afterwards."""
    try:
        kwargs = {"path_initial_model_for_weight_conversion": str(initial)} if initial else {}
        save_adapter(peft_model, target, state, info, model, **kwargs)
    finally:
        if initial is not None:
            shutil.rmtree(initial.parent, ignore_errors=True)
