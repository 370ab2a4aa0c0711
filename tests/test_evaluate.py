"""Our generation evaluator: PEFT's DoRA cache is on while generating and changes no answer.

After generation the cache is gone."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch


def _dora_llama(seed: int = 0):
    """A tiny Llama with DoRA on every linear layer and non-zero B, so DoRA's rescaling matters."""
    from peft import LoraConfig, get_peft_model

    import helpers

    model = helpers.tiny_llama(seed=seed, vocab=helpers.VOCAB)
    config = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules="all-linear", lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + 1)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return peft_model.eval()


def _caches(model):
    from peft.tuners.lora.dora import DoraLinearLayer

    return [m._dora_cache for m in model.modules() if isinstance(m, DoraLinearLayer)]


def test_the_dora_cache_is_reused_across_forwards_and_emptied_on_exit():
    from peft.tuners.lora import dora

    from eva_lora.app.recipes.evaluate import dora_inference_cache

    model = _dora_llama()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        uncached = model(input_ids=ids).logits
        with dora_inference_cache(model) as on:
            assert on and dora.ENABLE_DORA_CACHING
            first = model(input_ids=ids).logits
            caches = _caches(model)
            # 7 linears x 2 blocks ("all-linear" leaves lm_head out), each caching its norm and s*BA
            assert len(caches) == 2 * 7 and all(len(c) == 2 for c in caches)
            held = [dict(c) for c in caches]
            second = model(input_ids=ids).logits
            # reused, not recomputed
            assert all(c[k] is h[k] for c, h in zip(_caches(model), held) for k in h)
    assert not dora.ENABLE_DORA_CACHING and all(not c for c in _caches(model))
    assert torch.equal(first, uncached) and torch.equal(second, uncached)


def test_a_model_without_dora_is_left_alone(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from eva_lora.app.recipes.evaluate import dora_inference_cache

    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules="all-linear"))
    with dora_inference_cache(model) as on:
        assert on is False


def test_dora_answers_are_the_same_with_the_cache_as_without(tiny_llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    from eva_lora.app.recipes import evaluate

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    prompts = ["the cat sat on", "question : what is two plus two ? answer :", "hello"]
    cached = evaluate.generate_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=12)

    @contextmanager
    def no_cache(_model):
        yield False

    monkeypatch.setattr(evaluate, "dora_inference_cache", no_cache)
    uncached = evaluate.generate_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=12)
    assert cached == uncached
    assert any(text.strip() for text in cached)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_cache_is_skipped_when_it_would_not_fit_the_free_memory():
    from eva_lora.app.recipes.evaluate import dora_inference_cache

    model = _dora_llama().cuda()
    with dora_inference_cache(model, memory_fraction=0.5) as on:
        assert on is True  # a few kB against gigabytes free
    with dora_inference_cache(model, memory_fraction=0.0) as on:
        assert on is False
