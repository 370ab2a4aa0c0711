"""Evaluate a (PEFT) model on a task: class/score predictions for GLUE, greedy generation otherwise.

    eva eval --model minilm --task sst2 --adapter out/run/adapter

The entry point is :func:`run_eval`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...files import atomic_write_text
from ..models import check_max_length, load_model
from ..preprocess import Collator, encode_pair, render_user_prompt
from ..run_config import RunConfig
from ..tasks import Task, eval_tasks
from .runtime import check_output_file

EVAL_MAX_LENGTH = 512  # GLUE inputs are truncated as in the paper's setup (max length 512)


@torch.no_grad()
def predict_labels(model: Any, tokenizer: Any, task: Task, data: Any, batch_size: int) -> list[Any]:
    """Argmax class (classification) or the scalar output (regression), in dataset order."""
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(tokenizer.pad_token_id)
    out: list[Any] = []
    for start in range(0, len(data), batch_size):
        rows = data.select(range(start, min(start + batch_size, len(data))))
        encoded = [
            {k: v for k, v in encode_pair(r, tokenizer, EVAL_MAX_LENGTH).items() if k != "labels"}
            for r in rows
        ]
        batch = {k: v.to(device) for k, v in collate(encoded).items()}
        logits = model(**batch).logits.float()
        out.extend(
            logits[:, 0].tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
        )
    return out


@contextmanager
def dora_inference_cache(model: Any, memory_fraction: float = 0.5) -> Iterator[bool]:
    """Inside: PEFT's DoRA layers cache their adapted weight ``s·BA`` and the column norms of
    ``W + s·BA``; yields whether caching is on (False for a model without DoRA layers).

    Why: PEFT recomputes both on every forward, and generation runs one forward per new token, so a
    DoRA model generated ~3x slower than the same LoRA model here (SmolLM2, 200 new tokens). PEFT's
    own switch (``peft.tuners.lora.dora.ENABLE_DORA_CACHING``) caches them in eval mode only; the
    cached values are the ones it would recompute, so the answers do not change. The price is one
    extra copy of every DoRA-adapted weight while generating: on CUDA it is skipped when that copy
    would take more than ``memory_fraction`` of the free memory. The caches are emptied on exit, so
    no value outlives the weights it came from.
    """
    try:
        from peft.tuners.lora import dora
    except ImportError:
        yield False
        return
    caches = [m for m in model.modules() if isinstance(m, dora.DoraLinearLayer)]
    adapted = [
        m.get_base_layer().weight
        for m in model.modules()
        if getattr(m, "lora_magnitude_vector", None) and hasattr(m, "get_base_layer")
    ]
    cache_bytes = sum(w.numel() * w.element_size() for w in adapted)
    on_cuda = bool(adapted) and adapted[0].device.type == "cuda"
    if (
        not caches
        or not hasattr(dora, "ENABLE_DORA_CACHING")
        or (
            on_cuda
            and cache_bytes > memory_fraction * torch.cuda.mem_get_info(adapted[0].device)[0]
        )
    ):
        yield False
        return
    previous = dora.ENABLE_DORA_CACHING
    dora.ENABLE_DORA_CACHING = True
    try:
        yield True
    finally:
        dora.ENABLE_DORA_CACHING = previous
        for layer in caches:
            layer._cache_clear()


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int,
    special_tokens: bool = True,
    samples: int = 1,
    temperature: float = 0.8,
) -> list[str]:
    """Continuations of ``prompts`` (left-padded batches), decoded without the prompt: greedy, or
    ``samples`` sampled ones per prompt at ``temperature`` (prompt-major order), for pass@k.

    special_tokens=False for prompts rendered by a chat template, which already carries them.
    """
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(tokenizer.pad_token_id, side="left")
    decoding = (
        dict(do_sample=False)
        if samples == 1
        else dict(
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            num_return_sequences=samples,
        )
    )
    out: list[str] = []
    with dora_inference_cache(model):
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False):
            encoded = [
                tokenizer(p, add_special_tokens=special_tokens)
                for p in prompts[start : start + batch_size]
            ]
            batch = {
                k: v.to(device)
                for k, v in collate(
                    [
                        {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
                        for e in encoded
                    ]
                ).items()
            }
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **decoding,
            )
            out.extend(
                tokenizer.batch_decode(
                    generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
                )
            )
    return out


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    data: Any,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    samples: int = 1,
    temperature: float = 0.8,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, per-example records) of ``model`` on ``data`` (a task dataset, normalised columns).

    samples > 1 (code tasks): that many sampled answers per problem, scored as pass@1 and pass@k.
    """
    if task.kind == "generation":
        prompts = list(data["prompt"])
        if task.chat:
            prompts = [render_user_prompt(tokenizer, p) for p in prompts]
        texts = generate_answers(
            model,
            tokenizer,
            prompts,
            batch_size,
            max_new_tokens,
            special_tokens=not task.chat,
            samples=samples,
            temperature=temperature,
        )
        predictions = [task.extract(t) for t in texts]
        if samples > 1:
            predictions = [
                predictions[i : i + samples] for i in range(0, len(predictions), samples)
            ]
            texts = [texts[i : i + samples] for i in range(0, len(texts), samples)]
        references = list(data["answer"])
        records = [
            {"prediction": p, "reference": r, "generation": t}
            for p, r, t in zip(predictions, references, texts)
        ]
    else:
        predictions = predict_labels(model, tokenizer, task, data, batch_size)
        references = list(data["label"])
        records = [{"prediction": p, "reference": r} for p, r in zip(predictions, references)]
    metrics = {k: round(v, 6) for k, v in task.score(predictions, references).items()}
    return {**metrics, "n": len(references)}, records


def evaluate_all(
    model: Any, tokenizer: Any, cfg: RunConfig, items: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every evaluation task of ``cfg.task`` (7 for common sense, with their mean).

    ``items``, when given, receives each task's per-item predictions and references
    (:func:`item_record`): what a test over test items (McNemar, a paired bootstrap) needs, where
    the metrics alone only allow a test over seeds."""
    results: dict[str, Any] = {}
    if cfg.validation:  # the held-out training rows, never the test set
        return _evaluate_validation(model, tokenizer, cfg, items)
    tasks = eval_tasks(cfg.task)
    # one file cannot hold 7 common-sense test sets
    file = cfg.eval_file if len(tasks) == 1 else None
    for task in tasks:
        data = task.load("eval", cfg.data_dir, file, cfg.eval_limit)
        results[task.name] = _score(model, tokenizer, cfg, task, data, task.name, items)
    if len(results) > 1:
        # the parts of a joint task share it (accuracy; pass@1 for code)
        metric = tasks[0].main_metric
        key = "mean_accuracy" if metric == "accuracy" else f"mean_{metric}"
        results[key] = round(sum(m[metric] for m in results.values()) / len(results), 6)
    return results


def item_record(task: Task, records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-item predictions and references of one task, in the order of its evaluation rows (the
    same rows for every run with the same ``eval_limit``), and for accuracy tasks whether each item
    is right, by the task's own scorer (answers are compared after normalisation). Generations are
    left out: large, and the predictions are what the metrics score."""
    out: dict[str, list[Any]] = {
        "prediction": [r["prediction"] for r in records],
        "reference": [r["reference"] for r in records],
    }
    if task.main_metric == "accuracy":
        out["correct"] = [
            task.score([r["prediction"]], [r["reference"]])["accuracy"] == 1.0 for r in records
        ]
    return out


def _evaluate_validation(
    model: Any, tokenizer: Any, cfg: RunConfig, items: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Scores on the training rows ``cfg.validation`` holds out (``eval_limit`` of them at most)."""
    from ..tasks import get_task
    from ..tasks.base import split_validation, subset_indices

    task = get_task(cfg.task)
    _, data = split_validation(
        task.load("train", cfg.data_dir, cfg.train_file, cfg.train_limit), cfg.validation
    )
    if cfg.eval_limit is not None and cfg.eval_limit < len(data):
        data = data.select(subset_indices(len(data), cfg.eval_limit))
    return {"validation": _score(model, tokenizer, cfg, task, data, "validation", items)}


def _score(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    task: Task,
    data: Any,
    name: str,
    items: dict[str, Any] | None,
) -> dict[str, Any]:
    """One evaluation set scored with the run's settings; its items kept under ``name``."""
    # sampled answers (samples > 1) are reproducible; greedy ones do not care
    torch.manual_seed(cfg.seed)
    metrics, records = evaluate_task(
        model,
        tokenizer,
        task,
        data,
        cfg.eval_batch_size,
        cfg.max_new_tokens,
        cfg.samples,
        cfg.temperature,
    )
    if items is not None:
        items[name] = item_record(task, records)
    return metrics


def load_with_adapter(cfg: RunConfig, adapter: str | None) -> tuple[Any, Any]:
    """(model, tokenizer): the base model for ``cfg.task``'s kind, with the PEFT adapter attached if
    given. The one way every evaluator (ours, lm-eval's, the paper checks) loads what it scores."""
    from ..tasks import get_task

    task = get_task(cfg.task)
    model, tokenizer = load_model(
        cfg.model, task.kind, task.num_labels, cfg.bf16, cfg.seed, cfg.progress, cfg.load_in_4bit
    )
    if adapter is not None:
        from peft import PeftModel

        from ...model_card import check_adapter_model

        check_adapter_model(adapter, model, cfg.force)
        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer


def run_eval(cfg: RunConfig, adapter: str | None, output: str | None = None) -> dict[str, Any]:
    """Load the base model (plus ``adapter``), evaluate, write ``output`` (JSON, atomic) if set."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"adapter folder {adapter} has no adapter_config.json")
    if cfg.eval_file is None:  # fail on a missing data directory before loading the model
        for each in eval_tasks(cfg.task):
            each.path("eval", cfg.data_dir)
    check_max_length(cfg)
    if output is not None:
        check_output_file(Path(output))
    model, tokenizer = load_with_adapter(cfg, adapter)
    start = time.perf_counter()
    results = {
        "task": cfg.task,
        "model": cfg.model,
        "adapter": adapter,
        "metrics": evaluate_all(model, tokenizer, cfg),
    }
    results["eval_seconds"] = round(time.perf_counter() - start, 2)
    if output is not None:
        atomic_write_text(output, json.dumps(results, indent=2))
    return results
