"""Runs that used to exit 0 with a wrong result (issue #26): each now refuses, or warns by name.

Every test here failed against the code before the fix (see docs/reliability.md)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from eva_lora import EvaConfig, apply_eva_state, compute_eva_state
from eva_lora.app.cli import main
from helpers import tiny_llama, token_batches

DATA = Path(__file__).parent / "assets/data"
QUICK = [
    "train_limit=16",
    "eval_limit=2",
    "max_steps=2",
    "save_steps=2",
    "max_length=96",
    "batch_size=4",
    "svd_batch_size=4",
    "logging_steps=1",
    "max_new_tokens=6",
    "eval_batch_size=2",
    "progress=false",
    "rank=4",
]
FAST = {"rank": 2, "tau": 0.5, "max_batches": 3}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def state_for(model, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_eva_state(
            model, token_batches(101, 3), EvaConfig(**{**FAST, **settings}), progress=False
        )


def test_a_used_output_folder_is_refused_and_resume_needs_the_same_run(
    tmp_path, capsys, tiny_llama_dir
):
    """pissa into D, lora into D, --resume: used to continue PiSSA's checkpoint as "init: lora"."""
    out = tmp_path / "run"
    common = [
        "train",
        "--model",
        tiny_llama_dir,
        "--task",
        "commonsense",
        "--data-dir",
        DATA,
        "--output-dir",
        out,
        "--no-eval",
        *QUICK,
    ]
    assert run_cli(capsys, *common, "--init", "pissa")[0] == 0
    assert (out / "checkpoint-2").is_dir() and json.loads((out / "run.json").read_text())[
        "settings"
    ]["init"] == "pissa"
    before = sorted(p.name for p in out.iterdir())

    code, err = run_cli(capsys, *common, "--init", "lora")
    assert code == 2 and "holds another run" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before

    code, err = run_cli(capsys, *common, "--init", "lora", "--resume")
    assert code == 2 and "init: recorded 'pissa', now 'lora'" in err

    assert run_cli(capsys, *common, "--init", "lora", "--overwrite")[0] == 0  # starts afresh
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init"] == "lora" and not (out / ".initial").exists()
    assert json.loads((out / "run.json").read_text())["settings"]["init"] == "lora"


def test_resume_refuses_another_data_file(tmp_path, capsys, tiny_llama_dir):
    from eva_lora.app.recipes.run_folder import check_inputs, write_run_manifest
    from eva_lora.app.run_config import build_run_config
    from eva_lora.fingerprints import data_fingerprint, model_fingerprint

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"text": "a", "label": 1}\n')
    second.write_text('{"text": "b", "label": 0}\n')
    model = model_fingerprint(tiny_llama())
    cfg = build_run_config(overrides={"output_dir": str(tmp_path / "run"), "resume": True})
    write_run_manifest(
        build_run_config(overrides={"output_dir": str(tmp_path / "run")}),
        tmp_path / "run",
        model,
        data_fingerprint(first),
    )
    check_inputs(cfg, tmp_path / "run", model, data_fingerprint(first))  # the same: accepted
    with pytest.raises(ValueError, match="made from another model or data"):
        check_inputs(cfg, tmp_path / "run", model, data_fingerprint(second))
    with pytest.raises(ValueError, match="weights_sha256"):
        check_inputs(
            cfg, tmp_path / "run", model_fingerprint(tiny_llama(seed=1)), data_fingerprint(first)
        )


def test_a_state_for_a_smaller_model_is_refused_by_a_larger_one():
    state = state_for(tiny_llama(layers=2))
    with pytest.raises(
        ValueError,
        match=r"has 7 target layer\(s\) the state does not cover \(first: model.layers.2",
    ):
        apply_eva_state(tiny_llama(layers=3), state)
    # on purpose: only the state's layers
    peft_model = apply_eva_state(tiny_llama(layers=3), state, force=True)
    adapted = {
        n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert adapted and all(".layers.2." not in n for n in adapted)
    # same architecture: shapes and coverage agree
    apply_eva_state(tiny_llama(layers=2, seed=3), state)


def test_a_given_state_with_another_rank_is_refused_unless_forced():
    from eva_lora.app.initializers import LoraSettings, build_peft_model

    state = state_for(tiny_llama(), rank=4)
    with pytest.raises(ValueError, match=r"made with rank 4 \(run: 8\)"):
        build_peft_model(
            tiny_llama(),
            "eva",
            LoraSettings(task_type="CAUSAL_LM"),
            EvaConfig(rank=8),
            eva_state=state,
        )
    peft_model, used = build_peft_model(
        tiny_llama(),
        "eva",
        LoraSettings(task_type="CAUSAL_LM"),
        EvaConfig(rank=8),
        eva_state=state,
        force=True,
    )
    assert used.config.rank == 4 and peft_model.peft_config["default"].r == 4


def test_a_rank_above_a_layers_width_is_named_in_one_warning():
    with pytest.warns(
        UserWarning, match=r"layer group\(s\) are narrower than the 40 components"
    ) as caught:
        compute_eva_state(
            tiny_llama(),
            token_batches(101, 2),
            EvaConfig(rank=40, rho=1.0, tau=0.5, max_batches=2),
            progress=False,
        )
    narrow = [w for w in caught if "narrower" in str(w.message)]
    assert len(narrow) == 1 and "model.layers.0.self_attn.q_proj" in str(narrow[0].message)


def test_eval_refuses_an_adapter_trained_on_another_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    from eva_lora.fingerprints import model_fingerprint
    from eva_lora.model_card import check_adapter_model, save_adapter

    base = tiny_llama(layers=2)
    fingerprint = model_fingerprint(base)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(peft_model, tmp_path / "adapter", model=fingerprint)
    check_adapter_model(tmp_path / "adapter", tiny_llama(layers=2))
    # same model in bf16
    check_adapter_model(tmp_path / "adapter", tiny_llama(layers=2).to(torch.bfloat16))
    with pytest.raises(ValueError, match="was trained on another base model"):
        check_adapter_model(tmp_path / "adapter", tiny_llama(layers=3))
    check_adapter_model(tmp_path / "adapter", tiny_llama(layers=3), force=True)


def test_fingerprints_tell_checkpoints_apart_but_not_dtypes():
    from eva_lora.fingerprints import model_fingerprint

    one = model_fingerprint(tiny_llama())
    assert model_fingerprint(tiny_llama().to(torch.bfloat16)) == one
    other = model_fingerprint(tiny_llama(seed=1))
    assert (
        other["shapes_sha256"] == one["shapes_sha256"]
        and other["weights_sha256"] != one["weights_sha256"]
    )
    assert model_fingerprint(tiny_llama(layers=3))["parameters"] > one["parameters"]


def test_eva_init_honours_strict_and_progress(tmp_path, capsys):
    out = tmp_path / "state"
    code, err = run_cli(
        capsys,
        "init",
        "--output",
        out,
        "train_limit=64",
        "max_length=128",
        "svd_batch_size=8",
        "eva.max_batches=1",
        "eva.tau=0.999",
        "strict=true",
        "progress=false",
    )
    assert code == 3 and "EVA stopped (max_batches) after 1 batches" in err
    assert err.count("\n") == 1 and "it/s" not in err  # one line: no progress bar
    assert not out.exists()


def test_an_attention_mask_of_the_wrong_shape_is_refused():
    batches = token_batches(101, 2)
    batches[0]["attention_mask"] = batches[0]["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="attention_mask"):
        compute_eva_state(tiny_llama(), batches, EvaConfig(**FAST), progress=False)


def test_groups_without_an_estimate_keep_absorbing_rows_whatever_their_provisional_rank():
    """A first batch with fewer valid tokens than components leaves every group without an estimate;
    the provisional allocation then gives the later layers rank 0, and they used to be switched off
    (and the pass cut before them) for good: 0 tokens, and a state that could not be built."""
    import warnings

    import helpers
    from eva_lora import EvaConfig, compute_eva_state

    batches = helpers.token_batches(helpers.VOCAB, 4, seq=16)
    batches[0]["attention_mask"][:] = 0
    batches[0]["attention_mask"][0, :3] = 1  # 3 valid tokens, fewer than round(4 * 2) components
    config = EvaConfig(rank=4, rho=2.0, tau=1.0, statistics="exact", max_batches=4, check_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = compute_eva_state(helpers.tiny_llama(layers=3), batches, config, progress=False)
    valid = sum(int(b["attention_mask"].sum()) for b in batches)
    assert state.group_tokens == [valid] * len(state.groups)


def test_diagnostics_flag_a_label_mask_that_keeps_nothing_or_everything(tmp_path):
    """PEFT's label mask did nothing for 18 months without anyone noticing: a mask that keeps every
    token, or batches it empties, must be said, in the state, the warning and the model card."""
    import warnings

    import helpers
    from eva_lora import EvaConfig, EvaState, compute_eva_state
    from eva_lora.diagnostics import flags, summary_lines
    from eva_lora.model_card import model_card_text

    batches = helpers.token_batches(helpers.VOCAB, 6, seq=16)
    for batch in batches:
        # nothing marked -100: the mask keeps everything
        batch["labels"] = batch["input_ids"].clone()
    config = EvaConfig(rank=4, rho=1.0, tau=1.0, statistics="exact", max_batches=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = compute_eva_state(helpers.tiny_llama(), batches, config, progress=False)
    assert state.token_counts == {
        "batches": 6,
        "tokens": 6 * 48,
        "kept": 6 * 48,
        "label_masked_batches": 6,
        "empty_batches": 0,
    }
    assert any("label mask kept every one of 288 tokens" in str(w.message) for w in caught)
    state.save(tmp_path / "s")
    assert EvaState.load(tmp_path / "s").token_counts == state.token_counts
    assert "label mask kept every one" in model_card_text(state, {})

    for batch in batches[:2]:
        batch["labels"][:] = -100  # these batches keep nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = compute_eva_state(helpers.tiny_llama(), batches, config, progress=False)
    assert state.token_counts["empty_batches"] == 2 and state.token_counts["kept"] == 4 * 48
    assert flags(state)[0] == "2 of 6 batches had no token left after the attention and label masks"
    agreement = [a for a in state.group_stability if a is not None]
    assert agreement and all(0.0 <= a <= 1.0 for a in agreement)
    assert any(line.startswith("half-data agreement") for line in summary_lines(state))
