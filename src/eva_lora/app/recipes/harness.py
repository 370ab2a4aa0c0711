"""Evaluation with lm-evaluation-harness, the way the paper's authors scored common sense.

    eva eval --harness lm-eval --model smollm2 --task commonsense --data-dir ../shared/data \
        --adapter out/cs/adapter

The harness gets custom task definitions written on the fly (no download): one YAML per local test
file, whose documents are our own normalised rows, so the prompt is exactly the one our evaluator
uses (``doc_to_text: prompt``). Generation is greedy (``generate_until``, no sampling) up to
``max_new_tokens``, and ``process_results`` scores with our own answer extraction
(``Task.extract``, e.g. "the correct answer is X"). What differs is the harness's machinery: its
batching and padding of prompts, its stop sequences, and how it calls ``generate``; comparing the
two numbers on one adapter tests that our evaluator has no bug of its own.

The model is loaded here, as our evaluator loads it (``evaluate.load_with_adapter``),
and handed to ``HFLM`` as an object whose ``tie_weights`` does nothing. HFLM calls ``tie_weights()``
after attaching the adapter, which breaks an adapter on a *tied* LM head (SmolLM2 with the paper's
recipe: adapters on every linear layer, ``lm_head`` included); transformers tied them at load.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..models import check_max_length
from ..run_config import RunConfig
from ..tasks import eval_tasks
from .evaluate import dora_inference_cache, load_with_adapter
from .runtime import check_output_file

UTILS = '''"""Scoring for eva-lora's tasks inside lm-evaluation-harness: our own answer
extraction."""
from eva_lora.app.tasks import get_task


def process_results(doc, results):
    task = get_task(doc["eva_task"])
    prediction = task.extract(results[0])
    return {"acc": float(task.score([prediction], [doc["answer"]])[task.main_metric])}
'''


def write_tasks(cfg: RunConfig, folder: Path) -> list[str]:
    """One harness task per evaluation task of ``cfg.task`` (common sense: 7); returns the names."""
    (folder / "utils.py").write_text(UTILS, encoding="utf-8")
    names = []
    for task in eval_tasks(cfg.task):
        if task.kind != "generation":
            raise ValueError(
                f"--harness lm-eval scores generation tasks; {task.name} is a {task.kind} task"
            )
        data = task.load(
            "eval",
            cfg.data_dir,
            cfg.eval_file if len(eval_tasks(cfg.task)) == 1 else None,
            cfg.eval_limit,
        )
        rows = folder / f"{task.name}.jsonl"
        with open(rows, "w", encoding="utf-8") as handle:
            for row in data:
                handle.write(
                    json.dumps(
                        {"prompt": row["prompt"], "answer": row["answer"], "eva_task": task.name}
                    )
                    + "\n"
                )
        name = f"eva_{task.name.replace('-', '_')}"
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(rows)}},
            "test_split": "test",
            "output_type": "generate_until",
            "num_fewshot": 0,
            "doc_to_text": "prompt",
            "doc_to_target": "answer",
            "generation_kwargs": {
                "until": [],
                "do_sample": False,
                "max_gen_toks": cfg.max_new_tokens,
            },
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (folder / f"{name}.yaml").write_text(_yaml(config), encoding="utf-8")
        names.append(name)
    return names


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return (
        yaml.safe_dump(config, sort_keys=False)
        + "process_results: !function utils.process_results\n"
    )


def _already_tied(*args: object, **kwargs: object) -> None:
    """Stands in for ``tie_weights`` on the model handed to HFLM (see ``run_harness``)."""


def run_harness(
    cfg: RunConfig, adapter: str | None, output: str | None = None, samples: bool = False
) -> dict[str, Any]:
    """Accuracy per task (and the mean) from lm-evaluation-harness, with our prompts and extraction;
    with ``samples`` also every generation, per task, in the order of the task's rows."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(
            "--harness lm-eval needs lm-evaluation-harness (pip install lm-eval)"
        ) from None
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"adapter folder {adapter} has no adapter_config.json")
    check_max_length(cfg)
    if output is not None:
        check_output_file(Path(output))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        names = write_tasks(cfg, Path(tmp))  # before loading: a missing data folder fails fast
        base, tokenizer = load_with_adapter(cfg, adapter)
        base = base.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        # HFLM calls tie_weights() on whatever it is given. The weights
        # were tied when transformers loaded the base model; re-tying after
        # PEFT wrapped lm_head fails ("attribute 'weight' already exists").
        base.tie_weights = _already_tied
        model = HFLM(
            pretrained=base, tokenizer=tokenizer, batch_size=cfg.eval_batch_size, max_length=4096
        )
        # as in our evaluator: DoRA adapters generate ~3x faster, same answers
        with dora_inference_cache(base):
            found = lm_eval.simple_evaluate(
                model=model,
                tasks=names,
                task_manager=TaskManager(include_path=tmp, include_defaults=False),
                log_samples=samples,
                random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
            )
    metrics = {
        name.removeprefix("eva_").replace("_", "-"): round(
            float(found["results"][name]["acc,none"]), 6
        )
        for name in names
    }
    if len(metrics) > 1:
        metrics["mean_accuracy"] = round(sum(metrics.values()) / len(metrics), 6)
    result = {
        "task": cfg.task,
        "model": cfg.model,
        "adapter": adapter,
        "harness": f"lm-eval {lm_eval.__version__}",
        "metrics": metrics,
        "eval_seconds": round(time.perf_counter() - start, 2),
    }
    if samples:
        result["generations"] = {
            name.removeprefix("eva_").replace("_", "-"): [
                s["resps"][0][0] for s in sorted(found["samples"][name], key=lambda s: s["doc_id"])
            ]
            for name in names
        }
    if output is not None:
        from ...files import atomic_write_text

        atomic_write_text(output, json.dumps(result, indent=2))
    return result
