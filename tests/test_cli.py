"""The `eva` CLI end to end on tiny models (a few steps), bad input, resume, compare and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import helpers
from eva_lora.app.cli import main

DATA = Path(__file__).parent / "assets/data"
QUICK_GLUE = [
    "train_limit=32",
    "eval_limit=16",
    "max_steps=3",
    "max_length=32",
    "batch_size=8",
    "svd_batch_size=8",
    "logging_steps=1",
    "progress=false",
]
QUICK_GEN = [
    "train_limit=16",
    "eval_limit=2",
    "max_steps=2",
    "max_length=96",
    "batch_size=4",
    "svd_batch_size=4",
    "logging_steps=1",
    "max_new_tokens=6",
    "eval_batch_size=2",
    "progress=false",
    "rank=4",
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load_adapter(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir)


def test_train_eva_on_minilm_sst2_writes_a_loadable_adapter(tmp_path, capsys, minilm):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--task", "sst2", "--init", "eva", "--output-dir", out, *QUICK_GLUE
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["eval"]["sst2"]["n"] == 16
    assert 0.0 <= metrics["eval"]["sst2"]["accuracy"] <= 1.0 and metrics["train_loss"] > 0
    assert metrics["eva"]["stop_reason"] in ("converged", "data_exhausted", "max_batches")
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert (
        config["r"] == 8
        and config["lora_alpha"] == 1.0
        and "classifier" in str(config["modules_to_save"])
    )
    assert sum(metrics["eva"]["ranks"].values()) == 8 * len(metrics["eva"]["ranks"])
    # per-item predictions for tests over test items: the metric recomputed from them
    items = json.loads((out / "predictions.json").read_text())["sst2"]
    assert len(items["prediction"]) == len(items["reference"]) == 16
    right = sum(p == r for p, r in zip(items["prediction"], items["reference"]))
    assert right / 16 == pytest.approx(metrics["eval"]["sst2"]["accuracy"])
    assert items["correct"] == [p == r for p, r in zip(items["prediction"], items["reference"])]
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm[0].name_or_path, num_labels=2)
    loaded = load_adapter(base, out / "adapter")
    trained_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    # B moved away from its zero init
    assert trained_b and all(float(p.abs().max()) > 0 for p in trained_b)
    code, stdout, _ = run_cli(
        capsys, "eval", "--task", "sst2", "--adapter", out / "adapter", "eval_limit=16"
    )
    assert (
        code == 0 and json.loads(stdout)["sst2"]["accuracy"] == metrics["eval"]["sst2"]["accuracy"]
    )
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_train_generation_masks_the_prompt_and_evaluates(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "gsm"
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        DATA,
        "--init",
        "eva",
        "--output-dir",
        out,
        *QUICK_GEN,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval"]["gsm8k"]["n"] == 2 and metrics["steps"] == 2
    items = json.loads((out / "predictions.json").read_text())["gsm8k"]
    assert len(items["reference"]) == len(items["correct"]) == 2
    assert sum(items["correct"]) / 2 == metrics["eval"]["gsm8k"]["accuracy"]
    from transformers import AutoTokenizer

    from eva_lora.app.preprocess import IGNORE, tokenize
    from eva_lora.app.tasks import get_task

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = get_task("gsm8k").load("train", DATA, limit=2)
    prepared = tokenize(data, tok, "generation", 512, drop_long=False)
    row = prepared.dataset[0]
    n_prompt = len(tok(data[0]["prompt"])["input_ids"])
    assert all(v == IGNORE for v in row["labels"][:n_prompt])
    assert (
        row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        and row["labels"][-1] == tok.eos_token_id
    )


@pytest.mark.parametrize(
    "init",
    [
        "lora",
        "dora",
        "pissa",
        "olora",
        "corda",
        "lora-ga",
        "adalora",
        "eva-dora",
        "eva-whiten",
        "eva-perm",
        "eva-rot",
        "lora-redist",
    ],
)
def test_every_registered_init_trains_and_saves_a_standard_adapter(
    tmp_path, capsys, tiny_llama_dir, init
):
    out = tmp_path / init
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        tiny_llama_dir,
        "--task",
        "commonsense",
        "--data-dir",
        DATA,
        "--init",
        init,
        "--output-dir",
        out,
        "--no-eval",
        *QUICK_GEN,
    )
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["trainable_parameters"] > 0
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
        model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter")
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # two steps of training changed the model
    assert float((logits - base_logits).abs().max()) > 1e-6
    assert not (out / ".initial").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_applies_to_the_original_weights(tmp_path, tiny_llama_dir, init):
    """PiSSA / OLoRA rewrite W; the saved adapter is converted so that the *original* base model
    plus the adapter computes what the trained (residual base + adapter) model computes."""
    from transformers import AutoModelForCausalLM

    from eva_lora import EvaConfig
    from eva_lora.app.initializers import LoraSettings, build_peft_model
    from eva_lora.app.recipes.train import _save_adapter, _save_initial

    trained, _ = build_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        init,
        LoraSettings(task_type="CAUSAL_LM"),
        EvaConfig(rank=4),
    )
    initial = _save_initial(trained, tmp_path)  # as the recipe does, before training
    with torch.no_grad():  # stand-in for training: move every LoRA weight
        for index, (_, param) in enumerate(
            p for p in trained.named_parameters() if "lora_" in p[0]
        ):
            param.add_(
                0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(index))
            )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    _save_adapter(trained, tmp_path / "adapter", initial)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    # converted adapters hold rank 2r
    assert config["r"] == 8 and config["init_lora_weights"] is True
    original = load_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter"
    )
    with torch.no_grad():
        got = original(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["lora", "pissa", "olora"])
def test_an_init_on_a_tied_head_keeps_the_embeddings_and_saves_only_the_adapter(tmp_path, init):
    """A head tied to the input embeddings: PiSSA / OLoRA must rewrite only the head's weight (PEFT
    alone writes the residual into the shared tensor, changing the embeddings), and the saved
    adapter, free of any copy of the head or embeddings (PEFT's "auto" adds one), must reproduce the
    trained model on the original tied model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from eva_lora import EvaConfig
    from eva_lora.app.initializers import LoraSettings, build_peft_model, get_init_method
    from eva_lora.app.recipes.train import _save_adapter, _save_initial

    helpers.tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.lm_head.weight is base.get_input_embeddings().weight
    embeddings = base.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    trained, _ = build_peft_model(
        base,
        init,
        LoraSettings(task_type="CAUSAL_LM"),
        EvaConfig(rank=4, target_modules="all-linear-and-head"),
    )
    assert float((trained.get_input_embeddings().weight - embeddings).abs().max()) == 0.0
    with torch.no_grad():  # PiSSA / OLoRA start from the same function (residual + adapter = W)
        torch.testing.assert_close(trained(input_ids=ids).logits, base_logits, rtol=1e-4, atol=1e-4)
    initial = _save_initial(trained, tmp_path) if get_init_method(init).weight_changing else None
    with torch.no_grad():  # stand-in for training: move every LoRA weight
        for index, (_, param) in enumerate(
            p for p in trained.named_parameters() if "lora_" in p[0]
        ):
            param.add_(
                0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(index))
            )
        want = trained(input_ids=ids).logits
    _save_adapter(trained, tmp_path / "adapter", initial)
    with safe_open(tmp_path / "adapter/adapter_model.safetensors", "pt") as saved:
        assert [key for key in saved.keys() if "lora_" not in key] == []
    original = load_adapter(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    with torch.no_grad():
        got = original(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_converted_classifier_adapter_keeps_its_trained_head(tmp_path):
    """PEFT's PiSSA conversion writes only lora_A / lora_B; the trained classification head
    (modules_to_save) must be in the saved adapter too, or it loads with the base model's head."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from eva_lora import EvaConfig
    from eva_lora.app.initializers import LoraSettings, build_peft_model
    from eva_lora.app.recipes.train import _save_adapter, _save_initial

    helpers.tiny_bert().save_pretrained(tmp_path / "base")
    trained, _ = build_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
        "pissa",
        LoraSettings(task_type="SEQ_CLS"),
        EvaConfig(rank=4),
    )
    initial = _save_initial(trained, tmp_path)
    with torch.no_grad():  # stand-in for training: move the LoRA weights and the head
        moved = [p for n, p in trained.named_parameters() if p.requires_grad]
        assert any("classifier" in n and p.requires_grad for n, p in trained.named_parameters())
        for index, param in enumerate(moved):
            param.add_(
                0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(index))
            )
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        want = trained(input_ids=ids).logits
    _save_adapter(trained, tmp_path / "adapter", initial)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_trainer_checkpoints_hold_no_copy_of_the_embeddings(tmp_path):
    """The Trainer calls save_pretrained(dir) with PEFT's defaults; a checkpoint of an adapter on a
    tied LM head must not carry the head's base weight (the vocab x hidden matrix) either."""
    from safetensors import safe_open

    from eva_lora import EvaConfig
    from eva_lora.app.initializers import LoraSettings, build_peft_model
    from eva_lora.app.recipes.train import checkpoints_without_embedding_copies

    peft_model, _ = build_peft_model(
        helpers.tiny_llama(tie_word_embeddings=True),
        "lora",
        LoraSettings(task_type="CAUSAL_LM"),
        EvaConfig(rank=4, target_modules="all-linear-and-head"),
    )
    checkpoints_without_embedding_copies(peft_model)
    peft_model.save_pretrained(tmp_path / "checkpoint")  # as Trainer._save does
    with safe_open(tmp_path / "checkpoint/adapter_model.safetensors", "pt") as saved:
        assert [key for key in saved.keys() if "lora_" not in key] == []
    # an explicit choice still wins
    peft_model.save_pretrained(tmp_path / "asked", save_embedding_layers=True)
    with safe_open(tmp_path / "asked/adapter_model.safetensors", "pt") as saved:
        assert any("lm_head.base_layer" in key for key in saved.keys())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--init", "eva2"], "init must be one of lora, eva, eva-dora"),
        (["train", "--task", "qnli"], "task must be one of sst2, cola"),
        (["train", "--model", "{empty}"], "has no config.json"),
        (["train", "--model", "{config_only}"], "has no weights"),
        (
            ["train", "--task", "rte", "--data-dir", str(DATA), "--train-file", "{bad_columns}"],
            "lacks column(s) ['sentence1', 'sentence2', 'label']",
        ),
        (["train", "--resume"], "resume: no checkpoint-<step> folder"),
        (["train", "rankk=3"], "unknown run setting(s) ['rankk']"),
        (
            ["train", "--preset", "vision"],
            "unknown preset 'vision'; choose one of: code, commonsense, glue, math",
        ),
        (["train", "--config", "{bad_yaml}"], "is not valid YAML at line 3, column 1"),
        (["train", "max_steps=abc"], "max_steps must be an integer >= -1, got 'abc'"),
        (["train", "bf16=maybe"], "bf16 must be true or false, got 'maybe'"),
        (["train", "eval_limit=-5"], "eval_limit must be an integer >= 1 or null, got -5"),
        (["train", "seed=abc"], "seed must be an integer >= 0, got 'abc'"),
        (["train", "eva.rho=0.5"], "eva.rho must be a number >= 1.0, got 0.5"),
        (["train", "eva.rank=4"], "set rank at the top level"),
        (["eval", "--adapter", "{empty}"], "has no adapter_config.json"),
        (
            ["init", "eva.target_modules=(unclosed"],
            "eva.target_modules '(unclosed' is not a valid regular expression",
        ),
        (
            ["train", "eva.exclude_modules=[a"],
            "eva.exclude_modules '[a' is not a valid regular expression",
        ),
        (["train", "--train-file", "{empty_file}"], "empty.jsonl is empty"),
        (
            ["train", "--train-file", "{malformed}"],
            "malformed.jsonl cannot be parsed (ArrowInvalid",
        ),
        (["init", "--train-file", "{malformed}"], "malformed.jsonl cannot be parsed (ArrowInvalid"),
        (
            ["train", "max_length=4096"],
            "max_length 4096 is above the 512 positions model 'minilm' declares",
        ),
        (["init", "max_length=4096"], "max_length 4096 is above the 512 positions"),
        (["eval", "max_length=4096"], "max_length 4096 is above the 512 positions"),
        (["init", "--output", "{a_file}"], "is an existing file, not a state folder"),
        (["init", "--output", "{used}"], "already holds a state (or other files)"),
        (["eval", "--output", "{empty}"], "is a folder, expected a file path"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only/config.json").write_text("{}")
    (tmp_path / "bad.tsv").write_text("sentence\tscore\nhello\t1\n")
    (tmp_path / "bad.yaml").write_text("task: rte\nrank: [4\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "malformed.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": broken\n')
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "used").mkdir()
    (tmp_path / "used/eva_state.json").write_text("{}")
    paths = {
        "empty": tmp_path / "empty",
        "config_only": tmp_path / "config_only",
        "bad_columns": tmp_path / "bad.tsv",
        "bad_yaml": tmp_path / "bad.yaml",
        "empty_file": tmp_path / "empty.jsonl",
        "malformed": tmp_path / "malformed.jsonl",
        "a_file": tmp_path / "a_file",
        "used": tmp_path / "used",
    }
    before = sorted((p, p.stat().st_size) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    argv = [a.format(**paths) for a in argv] + ["--output-dir", str(out)]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2 and message in err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()
    # nothing written anywhere
    assert sorted((p, p.stat().st_size) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--state", "{missing}", "--out", "{a_file}"],
            "is an existing file, expected a folder for the PNG files",
        ),
        (["--state", "{missing}", "--out", "{plots}"], "not found"),
    ],
)
def test_plot_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("x")
    paths = {
        "a_file": tmp_path / "a_file",
        "missing": tmp_path / "no_state",
        "plots": tmp_path / "plots",
    }
    code, _, err = run_cli(capsys, "plot", *[a.format(**paths) for a in argv])
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_resume_continues_from_the_last_checkpoint(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "resume"
    common = [
        "--model",
        tiny_llama_dir,
        "--task",
        "commonsense",
        "--data-dir",
        DATA,
        "--init",
        "eva",
        "--output-dir",
        out,
        "--no-eval",
        *[a for a in QUICK_GEN if not a.startswith("max_steps")],
    ]
    assert run_cli(capsys, "train", *common, "max_steps=2", "save_steps=2")[0] == 0
    assert (out / "checkpoint-2").is_dir()
    first_log = json.loads((out / "metrics.json").read_text())["log"]
    state_before = (out / "eva_state/eva_state.safetensors").read_bytes()
    assert run_cli(capsys, "train", *common, "max_steps=4", "save_steps=2", "--resume")[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the history of steps 1-2 comes back from the checkpoint; steps 3-4 are new
    assert metrics["steps"] == 4 and [e["step"] for e in metrics["log"]] == [1, 2, 3, 4]
    assert metrics["log"][:2] == first_log
    # reused, not recomputed
    assert (out / "eva_state/eva_state.safetensors").read_bytes() == state_before


def test_a_second_run_into_the_same_folder_replaces_the_eva_state(tmp_path, capsys, tiny_llama_dir):
    """The saved eva_state/ must describe the adapter next to it, not an earlier run's."""
    common = [
        "train",
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        DATA,
        "--init",
        "eva",
        "--output-dir",
        tmp_path / "run",
        "--no-eval",
        *QUICK_GEN,
    ]
    from eva_lora import EvaState

    assert run_cli(capsys, *common, "eva.max_batches=3", "eva.tau=0.99999")[0] == 0
    assert EvaState.load(tmp_path / "run/eva_state").n_batches == 3
    code, _, err = run_cli(capsys, *common, "eva.max_batches=2", "eva.tau=0.99999")
    assert code == 2 and "holds another run" in err  # not silently mixed with the first run's files
    assert run_cli(capsys, *common, "eva.max_batches=2", "eva.tau=0.99999", "--overwrite")[0] == 0
    assert EvaState.load(tmp_path / "run/eva_state").n_batches == 2


def test_init_then_train_with_the_saved_state(tmp_path, capsys, tiny_llama_dir):
    state_dir = tmp_path / "state"
    common = ["--model", tiny_llama_dir, "--task", "gsm8k", "--data-dir", DATA, *QUICK_GEN]
    code, stdout, err = run_cli(capsys, "init", *common, "--output", state_dir)
    assert code == 0 and "EVA state: 14 layers" in stdout, err
    from eva_lora import EvaState

    state = EvaState.load(state_dir)
    code, _, err = run_cli(
        capsys,
        "train",
        *common,
        "--init",
        "eva",
        "--eva-state",
        state_dir,
        "--output-dir",
        tmp_path / "run",
        "--no-eval",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["eva"]["ranks"] == state.ranks
    code, _, err = run_cli(capsys, "train", *common, "--init", "lora", "--eva-state", state_dir)
    assert code == 2 and "only used by the EVA inits" in err


def test_compare_and_plot(tmp_path, capsys, tiny_llama_dir):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(
        capsys,
        "compare",
        "--model",
        tiny_llama_dir,
        "--task",
        "boolq",
        "--data-dir",
        DATA,
        "--inits",
        "lora,eva",
        "--seeds",
        "0,1",
        "--output-dir",
        out,
        *QUICK_GEN,
    )
    assert code == 0, err
    assert "| lora | 2 | accuracy |" in stdout and "| eva | 2 | accuracy |" in stdout
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("init,seeds,metric,mean,std") and len(rows) == 3
    code, stdout, err = run_cli(
        capsys,
        "plot",
        "--state",
        out / "eva/seed0/eva_state",
        "--compare",
        out,
        "--out",
        tmp_path / "plots",
    )
    assert code == 0, err
    for name in ("ranks.png", "convergence.png", "diagnostics.png", "loss.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_yaml_config_mirrors_the_dataclasses(tmp_path):
    from eva_lora.app.run_config import build_run_config

    file = tmp_path / "run.yaml"
    file.write_text("task: rte\nrank: 4\nlearning_rate: 1.0e-3\neva:\n  rho: 1.5\n  tau: 0.95\n")
    cfg = build_run_config("glue", file, {"eva": {"tau": 0.9}, "batch_size": 8})
    assert (cfg.task, cfg.rank, cfg.learning_rate, cfg.batch_size, cfg.warmup_ratio) == (
        "rte",
        4,
        1e-3,
        8,
        0.06,
    )
    assert (cfg.eva.rho, cfg.eva.tau, cfg.eva.rank) == (1.5, 0.9, 4)
    with pytest.raises(ValueError, match=r"unknown eva setting\(s\) \['rhoo'\]"):
        build_run_config(None, None, {"eva": {"rhoo": 2}})
    # YAML reads 5e-4 as text
    assert build_run_config(None, None, {"learning_rate": "5e-4"}).learning_rate == 5e-4


def test_init_checkpoints_and_resumes_from_the_cli(tmp_path, capsys, tiny_llama_dir):
    common = [
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        DATA,
        *QUICK_GEN,
        "eva.tau=0.99999",
    ]
    out = tmp_path / "state"
    code, _, err = run_cli(capsys, "init", *common, "--output", out, "--resume")
    assert code == 2 and "no checkpoint in" in err and not out.exists()
    assert run_cli(capsys, "init", *common, "--output", out, "--checkpoint-every", "1")[0] == 0
    meta = json.loads((tmp_path / "state.ckpt/eva_checkpoint.json").read_text())
    # 16 examples / svd_batch_size 4, one checkpoint per batch, the last kept
    assert meta["steps"] == 4
    from eva_lora import EvaState

    first = EvaState.load(out)
    # other folder
    assert run_cli(capsys, "init", *common, "--output", tmp_path / "again", "--resume")[0] == 2
    code, _, err = run_cli(capsys, "init", *common, "--output", out, "--resume")
    assert code == 0, err
    again = EvaState.load(out)
    assert again.ranks == first.ranks and again.n_batches == first.n_batches


def test_a_full_disk_is_reported_before_the_work_starts(
    tmp_path, capsys, tiny_llama_dir, monkeypatch
):
    """The free-space check runs before EVA (a full disk is faked: disk_usage reports one)."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "state"
    code, _, err = run_cli(
        capsys,
        "init",
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        DATA,
        *QUICK_GEN,
        "--output",
        out,
    )
    assert code == 2 and "not enough free space for the EVA state" in err and not out.exists()


@pytest.mark.slow
def test_init_takes_a_gguf_file_directly(tmp_path, capsys, monkeypatch):
    from eva_lora.app.models import smollm2_gguf

    monkeypatch.setenv("EVA_LORA_CACHE", str(tmp_path / "cache"))
    gguf = smollm2_gguf()
    code, out, err = run_cli(
        capsys,
        "init",
        "--model",
        gguf,
        "--task",
        "gsm8k",
        "--data-dir",
        DATA,
        "--output",
        tmp_path / "state",
        "train_limit=8",
        "svd_batch_size=4",
        "max_length=384",
        "progress=false",
        "rank=2",
        "eva.max_batches=2",
    )
    assert code == 0, err
    assert "210 layers" in out  # SmolLM2's 30 blocks x 7 linear layers
    cached = list((tmp_path / "cache").iterdir())
    # dequantised once, reused after
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    code, _, err = run_cli(capsys, "init", "--model", tmp_path / "missing.gguf", "--task", "gsm8k")
    assert code == 2 and "not found" in err


def test_compare_chooses_each_inits_learning_rate_on_held_out_training_rows(
    tmp_path, capsys, tiny_llama_dir
):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(
        capsys,
        "compare",
        "--model",
        tiny_llama_dir,
        "--task",
        "boolq",
        "--data-dir",
        DATA,
        "--inits",
        "lora,eva",
        "--seeds",
        "0",
        "--lr",
        "1e-4,3e-2",
        "--output-dir",
        out,
        *QUICK_GEN,
    )
    assert code == 0, err
    summary = json.loads((out / "comparison.json").read_text())["summary"]
    for row in summary:
        scores = {float(k): v for k, v in row["validation_scores"].items()}
        assert sorted(scores) == [1e-4, 3e-2]
        best = max(scores.values())
        # ties: the smaller rate
        assert row["learning_rate"] == min(lr for lr, v in scores.items() if v == best)
        select = json.loads((out / row["init"] / "select-lr0.0001/metrics.json").read_text())
        # no test score
        assert list(select["eval"]) == ["validation"] and select["config"]["validation"] == 0.2
        final = json.loads(
            (out / row["init"] / f"seed0-lr{row['learning_rate']:g}/metrics.json").read_text()
        )
        # the test set, all train rows
        assert "boolq" in final["eval"] and final["config"]["validation"] == 0.0
        assert final["config"]["learning_rate"] == row["learning_rate"]
    assert "chosen on validation" in stdout
    from eva_lora.app.tasks import get_task
    from eva_lora.app.tasks.base import split_validation

    rows = get_task("boolq").load("train", DATA, limit=16)
    fit, held = split_validation(rows, 0.2)
    assert len(held) == 3 and len(fit) == 13 and not set(held["prompt"]) & set(fit["prompt"])
