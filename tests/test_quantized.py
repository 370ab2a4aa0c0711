"""EVA on bitsandbytes 4-bit bases (QLoRA) on CPU: API, PEFT's QLoRA flow with the drop-in, CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import helpers
from eva_lora import EvaConfig, compute_eva_state

bnb = pytest.importorskip("bitsandbytes")

CONFIG = EvaConfig(rank=4, rho=1.0, tau=1.0, statistics="exact", max_batches=3)


def four_bit(path, quant_type: str = "nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu"
        )


def components(state) -> dict:
    return {tuple(g): c for g, c in zip(state.groups, state.group_components)}


def mean_agreement(a, b) -> float:
    """mean over layers of the mean |cos| of their components (order and sign of each may vary)."""
    ca, cb = components(a), components(b)
    return float(torch.tensor([(ca[k] * cb[k]).sum(1).abs().mean() for k in ca]).mean())


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.slow
def test_smollm2_in_nf4_and_fp4_gets_components_close_to_the_float_base():
    """The real SmolLM2-135M: the quantised base shifts the inputs a little, so the components agree
    closely (measured 2026-12-05 on 4 batches of 8 GSM8K questions: NF4 0.906 mean |cos| of the
    top 4 per layer, 0.964 for the first; FP4 0.824 / 0.911); float vs float would be 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eva_lora.app.models import resolve_model_path

    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    questions = [
        json.loads(line)["question"]
        for line in (helpers.BUNDLED / "gsm8k_train_2000.jsonl").read_text().splitlines()[:12]
    ]
    batches = [
        dict(tokenizer(questions[i : i + 4], return_tensors="pt", padding=True))
        for i in range(0, 12, 4)
    ]
    full = quiet(
        compute_eva_state,
        AutoModelForCausalLM.from_pretrained(path),
        batches,
        CONFIG,
        progress=False,
    )
    agreement = {
        q: mean_agreement(
            full, quiet(compute_eva_state, four_bit(path, q), batches, CONFIG, progress=False)
        )
        for q in ("nf4", "fp4")
    }
    assert agreement["nf4"] > 0.85 and agreement["fp4"] > 0.75
    # NF4 is the finer grid for normally distributed weights
    assert agreement["nf4"] > agreement["fp4"]


def test_eva_leaves_the_4bit_layers_trainable(tiny_llama_dir):
    """On a CPU with AVX512-BF16, a Linear4bit that runs in eval mode repacks its weight for an
    inference kernel without a backward; a LoRA trained afterwards would get no gradient through the
    base. EVA's passes keep those layers in train mode, so after EVA the base layers pass gradients
    on as before it."""
    model = four_bit(tiny_llama_dir)
    batches = helpers.token_batches(200, 3)
    quiet(compute_eva_state, model, batches, CONFIG, progress=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers
    )
    fresh = four_bit(tiny_llama_dir)
    grads = []
    for each in (model, fresh):
        embeddings = (
            each.get_input_embeddings()(batches[0]["input_ids"]).detach().requires_grad_(True)
        )
        each.train()
        each(
            inputs_embeds=embeddings, attention_mask=batches[0]["attention_mask"]
        ).logits.sum().backward()
        grads.append(embeddings.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


def test_peft_qlora_flow_with_the_drop_in(tiny_llama_dir):
    """PEFT's documented QLoRA recipe, eva-lora's initialize_lora_eva_weights replacing PEFT's."""
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from eva_lora import initialize_lora_eva_weights

    model = prepare_model_for_kbit_training(
        four_bit(tiny_llama_dir), use_gradient_checkpointing=False
    )
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights="eva",
        eva_config=PeftEvaConfig(rho=1.0),
    )
    peft_model = get_peft_model(model, config)
    batches = helpers.token_batches(200, 6)
    quiet(initialize_lora_eva_weights, peft_model, batches, show_progress_bar=False)
    a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    # orthonormal components
    assert a.shape == (4, 32) and torch.allclose(a @ a.T, torch.eye(4), atol=1e-4)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        batch = batches[0]
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_cli_init_and_train_on_a_4bit_base(tmp_path, capsys, tiny_llama_dir):
    from eva_lora import EvaState
    from eva_lora.app.cli import main

    data = ["--task", "gsm8k", "--data-dir", helpers.ROOT / "tests/assets/data", "--load-in-4bit"]
    quick = [
        "train_limit=16",
        "svd_batch_size=4",
        "max_length=96",
        "progress=false",
        "rank=4",
        "eva.max_batches=3",
    ]
    code = main(
        [
            str(a)
            for a in [
                "init",
                "--model",
                tiny_llama_dir,
                *data,
                "--sequential",
                "--output",
                tmp_path / "state",
                *quick,
            ]
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert EvaState.load(tmp_path / "state").n_batches == 3
    code = main(
        [
            str(a)
            for a in [
                "train",
                "--model",
                tiny_llama_dir,
                *data,
                "--eva-state",
                tmp_path / "state",
                "--output-dir",
                tmp_path / "run",
                "--no-eval",
                *quick,
                "max_steps=2",
                "batch_size=4",
            ]
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["config"]["load_in_4bit"] == "nf4"


def test_cli_refuses_what_a_4bit_base_cannot_do(tmp_path, capsys, tiny_llama_dir, monkeypatch):
    from eva_lora.app import models
    from eva_lora.app.cli import main

    common = [
        "train",
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        helpers.ROOT / "tests/assets/data",
        "--output-dir",
        tmp_path / "run",
        "--load-in-4bit",
        "progress=false",
    ]
    assert main([str(a) for a in [*common, "--init", "pissa"]]) == 2
    assert "rewrites the base weights, which a 4-bit base cannot hold" in capsys.readouterr().err
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name: None if name == "bitsandbytes" else real(name),
    )
    assert main([str(a) for a in common]) == 2
    err = capsys.readouterr().err
    assert "--load-in-4bit needs bitsandbytes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # sequential EVA quantises the blocks it reads from the folder itself: the same one line
    init = ["init", *common[1:7], "--sequential", "--load-in-4bit"]
    argv = [*init, "--output", tmp_path / "state", "progress=false", "max_length=96"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "needs bitsandbytes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
def test_smollm2_in_nf4_trains_through_peft_qlora_flow_with_the_drop_in():
    """The real SmolLM2-135M in NF4: PEFT's QLoRA recipe with eva-lora's drop-in, then training."""
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer

    from eva_lora import initialize_lora_eva_weights
    from eva_lora.app.models import resolve_model_path

    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    questions = [
        json.loads(line)["question"]
        for line in (helpers.BUNDLED / "gsm8k_train_2000.jsonl").read_text().splitlines()[:12]
    ]
    batches = [
        dict(tokenizer(questions[i : i + 4], return_tensors="pt", padding=True))
        for i in range(0, 12, 4)
    ]
    model = prepare_model_for_kbit_training(four_bit(path), use_gradient_checkpointing=False)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights="eva",
            eva_config=PeftEvaConfig(rho=1.0),
        ),
    )
    quiet(
        initialize_lora_eva_weights,
        peft_model,
        batches,
        show_progress_bar=False,
        eva_lora_config={"max_batches": 3},
    )
    a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.allclose(a @ a.T, torch.eye(a.shape[0]), atol=1e-4)  # EVA's orthonormal components
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    losses = []
    for _ in range(3):
        batch = {
            **batches[0],
            "labels": batches[0]["input_ids"].masked_fill(batches[0]["attention_mask"] == 0, -100),
        }
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_eva_on_a_torchao_int8_base_gets_the_float_bases_components(tmp_path):
    """A second quantisation backend: torchao's int8 weight-only base (its layers stay nn.Linear,
    their weights become ``Int8Tensor``). Measured 2026-12-05 on this tiny Llama: every component
    |cos| >= 0.997 against the float base's. (torchao 0.18's int4 formats do not run on a CPU:
    "plain" needs the mslk kernels, "plain_int32" no CPU; transformers 5.25 cannot load HQQ.)"""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    base = helpers.tiny_llama(layers=2)
    base.save_pretrained(tmp_path)
    config = TorchAoConfig(Int8WeightOnlyConfig())
    int8 = quiet(
        AutoModelForCausalLM.from_pretrained,
        tmp_path,
        quantization_config=config,
        device_map="cpu",
        dtype=torch.float32,
    )
    assert type(int8.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    settings = EvaConfig(rank=4, rho=1.0, tau=1.0, statistics="exact", max_batches=4)
    batches = helpers.token_batches(helpers.VOCAB, 4)
    quantised = quiet(compute_eva_state, int8, batches, settings, progress=False)
    full = quiet(compute_eva_state, base, batches, settings, progress=False)
    ca, cb = components(quantised), components(full)
    worst = min(float((ca[k] * cb[k]).sum(1).abs().min()) for k in ca)
    assert quantised.ranks == full.ranks and 0.99 <= worst < 1.0
