"""Fitting the stacks people train with: adapters that explain themselves, TRL's SFTTrainer,
accelerate launch, file permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_lora import EvaState
from eva_lora.app.cli import main
from helpers import free_port

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "assets/data"
QUICK = [
    "train_limit=16",
    "max_steps=2",
    "max_length=96",
    "batch_size=4",
    "svd_batch_size=4",
    "logging_steps=1",
    "progress=false",
    "rank=4",
]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saved_adapter_explains_itself_and_keeps_the_users_umask(
    tmp_path, capsys, tiny_llama_dir, umask_022
):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_llama_dir),
                "--task",
                "gsm8k",
                "--data-dir",
                str(DATA),
                "--init",
                "eva",
                "--output-dir",
                str(out),
                "--no-eval",
                *QUICK,
            ]
        )
        == 0
    )
    adapter = out / "adapter"
    card = (adapter / "README.md").read_text()
    state = EvaState.load(adapter / "eva_state")
    assert (
        f"base_model: {tiny_llama_dir}" in card
        and "**init method**: eva" in card
        and "**task**: gsm8k" in card
    )
    assert (
        f"stop reason: {state.stop_reason} after {state.n_batches} batches, {state.n_tokens} tokens"
        in card
    )
    # ranks per layer type
    assert "| self_attn.q_proj | 2 |" in card and "| mlp.down_proj | 2 |" in card
    assert "torch " in card and "peft " in card  # library versions
    assert mode(adapter) == 0o755
    for path in [*adapter.rglob("*"), out / "eva_state/eva_state.json", out / "metrics.json"]:
        assert mode(path) == (0o755 if path.is_dir() else 0o644), path
    capsys.readouterr()
    assert main(["plot", "--adapter", str(adapter), "--out", str(tmp_path / "plots")]) == 0
    for name in ("ranks.png", "convergence.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_an_adapter_made_by_peft_eva_can_be_inspected_as_far_as_its_files_allow(tmp_path, capsys):
    """PEFT's own EVA writes no state: the ranks come from the LoRA weights' shapes.

    Convergence is not drawn."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    from helpers import tiny_gpt2, token_batches

    peft_model = get_peft_model(
        tiny_gpt2(),
        LoraConfig(
            r=4,
            target_modules=["c_attn", "c_fc"],
            init_lora_weights="eva",
            eva_config=EvaConfig(rho=2, tau=0.5),
        ),
    )
    torch.manual_seed(0)
    initialize_lora_eva_weights(
        peft_model, token_batches(101, 6, batch=4, seq=16), show_progress_bar=False
    )
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    want = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    from eva_lora.model_card import adapter_ranks

    assert adapter_ranks(tmp_path / "peft-adapter") == want
    capsys.readouterr()
    assert (
        main(
            ["plot", "--adapter", str(tmp_path / "peft-adapter"), "--out", str(tmp_path / "plots")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (tmp_path / "plots/ranks.png").is_file() and not (
        tmp_path / "plots/convergence.png"
    ).exists()
    assert "no EVA state in" in out


def test_trl_sft_example_runs_offline_and_eva_sees_exactly_the_trained_tokens(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import trl_sft_eva

    summary = trl_sft_eva.main(["--tiny", "--output", str(tmp_path), "--max-steps", "3"])
    assert summary["steps"] == 3 and summary["train_loss"] > 0
    assert sum(summary["ranks"].values()) == 8 * 14 and max(summary["ranks"].values()) <= 16
    from peft import PeftModel

    model, _ = trl_sft_eva.tiny_model_and_tokenizer()
    loaded = PeftModel.from_pretrained(model, tmp_path / "adapter")
    assert {
        n: m.r["default"]
        for n, m in loaded.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    } == {k: v for k, v in summary["ranks"].items() if v > 0}
    assert "eva (eva-lora drop-in)" in (tmp_path / "adapter/README.md").read_text()


def test_trainer_batches_carry_the_completion_only_labels(tmp_path):
    """The helper hands EVA the trainer's own batches: prompt tokens are -100, and the EVA state
    counts exactly the completion tokens."""
    from peft import EvaConfig, LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(ROOT / "examples"))
    import trl_sft_eva
    from eva_lora.integrations import trainer_batches
    from eva_lora.peft_compat import compute_peft_style_state

    model, tokenizer = trl_sft_eva.tiny_model_and_tokenizer()
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0)
        ),
    )
    trainer = SFTTrainer(
        model=peft_model,
        processing_class=tokenizer,
        train_dataset=trl_sft_eva.chat_dataset(trl_sft_eva.GSM8K),
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            report_to="none",
            max_length=256,
            use_cpu=True,
            save_strategy="no",
        ),
    )
    batches = list(trainer_batches(trainer, 3))
    assert len(batches) == 3 and all(
        set(b) <= {"input_ids", "attention_mask", "labels"} for b in batches
    )
    trained = sum(int((b["labels"] != -100).sum()) for b in batches)
    prompts = sum(int(((b["labels"] == -100) & b["attention_mask"].bool()).sum()) for b in batches)
    assert trained > 0 and prompts > 0  # completion-only loss: prompt tokens carry -100
    state = compute_peft_style_state(
        trainer.model,
        batches,
        show_progress_bar=False,
        eva_lora_config={"tau": 1.0, "max_batches": 3},
    )
    assert state.n_batches == 3 and max(state.group_tokens) == trained


@pytest.mark.slow
def test_accelerate_launch_gives_the_same_eva_state_as_torchrun_semantics(tmp_path, tiny_llama_dir):
    """`accelerate launch --num_processes 2 -m eva_lora.app.cli train`: the EVA state equals one
    process checking after every 2 batches (as the torchrun test)."""
    common = [
        "--model",
        str(tiny_llama_dir),
        "--task",
        "commonsense",
        "--data-dir",
        str(DATA),
        "train_limit=16",
        "max_length=96",
        "batch_size=2",
        "svd_batch_size=4",
        "rank=4",
        "eva.tau=0.999999",
        "progress=false",
        "logging_steps=1",
    ]
    out = tmp_path / "acc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--cpu` makes accelerate run one process; `--multi_gpu` is its multi-process launcher
    # (torchrun underneath), which on a machine without GPUs gives CPU processes on gloo.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    proc = subprocess.run(
        [
            *launcher,
            "-m",
            "eva_lora.app.cli",
            "train",
            *common,
            "--init",
            "eva",
            "--output-dir",
            str(out),
            "--no-eval",
            "max_steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert main(["init", *common, "eva.check_every=2", "--output", str(tmp_path / "single")]) == 0
    single, launched = EvaState.load(tmp_path / "single"), EvaState.load(out / "eva_state")
    assert (
        launched.n_batches == single.n_batches == 4 and launched.group_tokens == single.group_tokens
    )
    assert launched.ranks == single.ranks
    for got, want in zip(launched.group_components, single.group_components):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
