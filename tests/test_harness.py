"""lm-evaluation-harness with our task definitions: the same prompts, greedy generations and scores."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "assets/data"


@pytest.mark.slow
def test_harness_generates_what_our_evaluator_generates(tiny_llama_dir):
    pytest.importorskip("lm_eval")
    from eva_lora.app.models import load_model
    from eva_lora.app.recipes.evaluate import generate_answers
    from eva_lora.app.recipes.harness import run_harness
    from eva_lora.app.run_config import build_run_config
    from eva_lora.app.tasks import get_task

    cfg = build_run_config(overrides={"model": str(tiny_llama_dir), "task": "boolq", "data_dir": str(DATA),
                                      "eval_limit": 4, "max_new_tokens": 8, "eval_batch_size": 1})
    found = run_harness(cfg, None, samples=True)
    model, tokenizer = load_model(cfg.model, "generation")
    data = get_task("boolq").load("eval", DATA, limit=4)
    ours = generate_answers(model, tokenizer, list(data["prompt"]), 1, 8)
    assert found["generations"]["boolq"] == ours  # same prompt, same greedy continuation
    task = get_task("boolq")
    want = task.score([task.extract(t) for t in ours], list(data["answer"]))["accuracy"]
    assert found["metrics"]["boolq"] == pytest.approx(want)
