"""EVA for trainers that do not offer it: `eva init` writes a ready PEFT adapter (A = components,
B = 0) that any LoRA tool continues from; `eva merge` folds a trained adapter into its base."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch

import helpers
from eva_lora import EvaConfig, apply_eva_state, compute_eva_state
from eva_lora.app.cli import main
from eva_lora.model_card import save_ready_adapter

DATA = helpers.ROOT / "tests/assets/data"


def first_step(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one training step."""
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
    }
    model.zero_grad()
    return float(loss), grads


def test_training_from_the_ready_adapter_equals_training_right_after_eva(tmp_path):
    from peft import PeftModel

    base = helpers.tiny_llama(layers=2)
    batches = helpers.token_batches(helpers.VOCAB, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = compute_eva_state(base, batches, EvaConfig(rank=4, rho=2.0), progress=False)
    direct = apply_eva_state(copy.deepcopy(base), state, lora_alpha=8.0, lora_dropout=0.0)
    save_ready_adapter(
        copy.deepcopy(base), state, tmp_path / "ready", lora_alpha=8.0, lora_dropout=0.0
    )
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ready", is_trainable=True)
    assert loaded.peft_config["default"].rank_pattern == direct.peft_config["default"].rank_pattern
    loss_a, grads_a = first_step(direct, batches[0])
    loss_b, grads_b = first_step(loaded, batches[0])
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for n, g in grads_a.items() if "lora_B" in n)  # B = 0 still learns


def test_eva_init_writes_a_ready_adapter_that_trl_trains_from(tmp_path, capsys):
    """The whole flow a TRL user would run: `eva init`, then SFTTrainer on
    PeftModel.from_pretrained(...)."""
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(helpers.ROOT / "examples"))
    import trl_sft_eva

    model, tokenizer = trl_sft_eva.tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    code = main(
        [
            str(a)
            for a in [
                "init",
                "--model",
                tmp_path / "base",
                "--task",
                "gsm8k",
                "--data-dir",
                DATA,
                "--output",
                tmp_path / "state",
                "train_limit=16",
                "svd_batch_size=4",
                "max_length=128",
                "progress=false",
                "rank=4",
                "lora_alpha=8",
            ]
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    ready = tmp_path / "state_adapter"
    assert f"ready adapter (B = 0) -> {ready}" in out
    assert (ready / "adapter_model.safetensors").is_file() and (ready / "README.md").is_file()
    assert json.loads((ready / "adapter_config.json").read_text())["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(model, ready, is_trainable=True)
    b_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert b_before and all(float(b.abs().max()) == 0 for b in b_before.values())
    trainer = SFTTrainer(
        model=peft_model,
        processing_class=tokenizer,
        train_dataset=trl_sft_eva.chat_dataset(trl_sft_eva.GSM8K),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            per_device_train_batch_size=4,
            report_to="none",
            max_length=128,
            use_cpu=True,
            save_strategy="no",
            learning_rate=1e-2,
        ),
    )
    trainer.train()
    moved = [
        n for n, p in trainer.model.named_parameters() if "lora_B" in n and float(p.abs().max()) > 0
    ]
    assert len(moved) == len(b_before)  # every adapted layer trained from EVA's A


def test_eva_init_refuses_a_used_adapter_folder_before_any_work(tmp_path, capsys, tiny_llama_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/adapter_config.json").write_text("{}")
    code = main(
        [
            str(a)
            for a in [
                "init",
                "--model",
                tiny_llama_dir,
                "--task",
                "gsm8k",
                "--data-dir",
                DATA,
                "--output",
                tmp_path / "state",
                "--adapter-out",
                tmp_path / "taken",
            ]
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--adapter-out" in err and "--no-adapter" in err
    assert not (tmp_path / "state").exists()


@pytest.mark.slow
@pytest.mark.parametrize("init", ["lora", "eva", "pissa"])
def test_merged_model_gives_the_adapters_logits(tmp_path, capsys, tiny_llama_dir, init):
    """PiSSA rewrites the base while training; its saved adapter is converted back to plain LoRA on
    the original base, so merging it into that base must give the trained model's outputs too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = ["--model", tiny_llama_dir, "--task", "gsm8k", "--data-dir", DATA]
    code = main(
        [
            str(a)
            for a in [
                "train",
                *common,
                "--init",
                init,
                "--output-dir",
                tmp_path / "run",
                "--no-eval",
                "train_limit=16",
                "max_steps=3",
                "max_length=96",
                "batch_size=4",
                "svd_batch_size=4",
                "progress=false",
                "rank=4",
                "learning_rate=0.01",
            ]
        ]
    )
    assert code == 0, capsys.readouterr().err
    code = main(
        [
            str(a)
            for a in [
                "merge",
                *common,
                "--adapter",
                tmp_path / "run/adapter",
                "--output",
                tmp_path / "merged",
                "--max-shard-size",
                "100KB",
            ]
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1  # sharded as asked
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "run/adapter"
        )(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
    assert float((adapted - base).abs().max()) > 1e-4  # the adapter changed the model
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_merge_refuses_what_it_cannot_do(tmp_path, capsys, tiny_llama_dir):
    common = [
        "merge",
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--output",
        tmp_path / "merged",
    ]
    assert main([str(a) for a in [*common, "--adapter", tmp_path / "nowhere"]]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged/x").write_text("")
    (tmp_path / "a").mkdir()
    (tmp_path / "a/adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main([str(a) for a in [*common, "--adapter", tmp_path / "a"]]) == 2
    assert "already holds files" in capsys.readouterr().err
