"""Crash safety: kill -9 during EVA and resume; checkpoint validation; no pickle anywhere."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import ckpt_worker
from eva_lora import EvaState, StateFileError, compute_eva_state

WORKER = Path(__file__).parent / "ckpt_worker.py"
SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def uninterrupted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_eva_state(
            ckpt_worker.model(), iter(ckpt_worker.batches()), ckpt_worker.config()
        )


def assert_same_state(got: EvaState, want: EvaState) -> None:
    assert (got.n_batches, got.stop_reason, got.group_tokens) == (
        want.n_batches,
        want.stop_reason,
        want.group_tokens,
    )
    assert got.ranks == want.ranks
    for a, b in zip(got.group_components, want.group_components):
        # bit-identical: the statistics continue as saved
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def checkpoint_step(directory: Path) -> int:
    try:
        return json.loads((directory / "eva_checkpoint.json").read_text())["steps"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("target,seed", [(0, 0), (6, 1), (17, 2)])
def test_kill_9_at_a_random_point_then_resume_gives_the_uninterrupted_result(
    tmp_path, uninterrupted, target, seed
):
    """SIGKILL once the run has checkpointed `target` batches, plus a random part of the next batch
    (which may fall inside a checkpoint write); then resume in a new process."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), "run", "0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while (
        checkpoint_step(tmp_path / "ckpt") < target
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0, 0.12))
    alive = proc.poll() is None  # the kill must land on a running worker, not on one that crashed
    reached = checkpoint_step(tmp_path / "ckpt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_step(tmp_path / "ckpt")
    print(f"killed after checkpoint {killed_at} of {ckpt_worker.N_BATCHES}")
    assert alive and proc.returncode == -signal.SIGKILL
    assert (
        target <= reached <= killed_at < ckpt_worker.N_BATCHES and not (tmp_path / "final").exists()
    )
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), "resume", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(EvaState.load(tmp_path / "final"), uninterrupted)


def test_resume_in_process_from_every_checkpoint_position(tmp_path, uninterrupted):
    """Stop after k batches (a one-shot iterator that ends), resume over the full sequence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in (1, 7, 15):
            ckpt = tmp_path / f"k{k}"
            compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()[:k]),
                ckpt_worker.config(),
                checkpoint_dir=ckpt,
                checkpoint_every=1,
            )
            state = compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()),
                ckpt_worker.config(),
                checkpoint_dir=ckpt,
                resume=True,
            )
            assert_same_state(state, uninterrupted)
            # older tensor files removed
            assert len(list(ckpt.glob("eva_checkpoint-*.safetensors"))) == 1


def test_resume_of_a_sketch_run_is_bit_identical(tmp_path):
    """The sketch's basis, power, mean and counts continue exactly as saved."""
    import dataclasses

    cfg = dataclasses.replace(ckpt_worker.config(), statistics="sketch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = compute_eva_state(ckpt_worker.model(), iter(ckpt_worker.batches()), cfg)
        for k in (3, 11):
            compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()[:k]),
                cfg,
                checkpoint_dir=tmp_path / f"k{k}",
                checkpoint_every=1,
            )
            resumed = compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()),
                cfg,
                checkpoint_dir=tmp_path / f"k{k}",
                resume=True,
            )
            assert resumed.group_statistics == ["sketch"] * len(resumed.groups)
            assert_same_state(resumed, straight)


def test_resume_accepts_a_checkpoint_when_only_apply_time_options_changed(tmp_path):
    """whiten / init_mode / adjust_alpha apply when A is built: the statistics are the same."""
    import dataclasses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_eva_state(
            ckpt_worker.model(),
            iter(ckpt_worker.batches()[:5]),
            ckpt_worker.config(),
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
        changed = dataclasses.replace(
            ckpt_worker.config(), whiten=True, init_mode="rot", adjust_alpha=False
        )
        state = compute_eva_state(
            ckpt_worker.model(),
            iter(ckpt_worker.batches()),
            changed,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    assert state.config.whiten and state.n_batches == ckpt_worker.N_BATCHES


def test_resume_refuses_other_settings_other_models_and_short_data(tmp_path):
    from eva_lora import EvaConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_eva_state(
            ckpt_worker.model(),
            iter(ckpt_worker.batches()[:5]),
            ckpt_worker.config(),
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
        other = EvaConfig(**{**ckpt_worker.config().to_dict(), "rho": 1.0})
        with pytest.raises(ValueError, match=r"other settings: \['rho'\]"):
            compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()),
                other,
                checkpoint_dir=tmp_path,
                resume=True,
            )
        with pytest.raises(ValueError, match="batches ended after 3 of the 5 batches"):
            compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()[:3]),
                ckpt_worker.config(),
                checkpoint_dir=tmp_path,
                resume=True,
            )
        with pytest.warns(RuntimeWarning, match="no EVA checkpoint"):
            compute_eva_state(
                ckpt_worker.model(),
                iter(ckpt_worker.batches()[:2]),
                ckpt_worker.config(),
                checkpoint_dir=tmp_path / "empty",
                resume=True,
            )
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        compute_eva_state(
            ckpt_worker.model(), ckpt_worker.batches(), ckpt_worker.config(), checkpoint_every=2
        )


def test_corrupted_checkpoint_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compute_eva_state(
            ckpt_worker.model(),
            iter(ckpt_worker.batches()[:3]),
            ckpt_worker.config(),
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
    tensor_file = next(tmp_path.glob("eva_checkpoint-*.safetensors"))
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match="does not match its checksum"):
        compute_eva_state(
            ckpt_worker.model(),
            iter(ckpt_worker.batches()),
            ckpt_worker.config(),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_no_pickle_loading_anywhere_in_the_package():
    """Every torch.load in our code must pass weights_only=True (there is none today)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if (
                "torch.load(" in line and "weights_only=True" not in line
            ) or "import pickle" in line:
                offenders.append(f"{path.name}:{number}")
    assert offenders == []


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_a_dataloader_that_raises_midway_is_named_and_leaves_no_hook():
    model = ckpt_worker.model()

    def flaky():
        yield from ckpt_worker.batches()[:2]
        raise OSError("disk read failed")

    with pytest.raises(
        RuntimeError, match=r"batches iterable raised while producing batch 3: OSError"
    ):
        compute_eva_state(model, flaky(), ckpt_worker.config())
    assert _hooks(model) == 0


def test_varying_shapes_and_all_padding_batches_count_exactly_the_valid_tokens():
    from helpers import token_batches

    batches = token_batches(101, 2, batch=4, seq=16) + token_batches(101, 2, batch=3, seq=9, seed=1)
    padding_only = dict(token_batches(101, 1, batch=2, seq=5, seed=2)[0])
    padding_only["attention_mask"] = torch.zeros_like(padding_only["attention_mask"])
    batches.insert(1, padding_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = compute_eva_state(ckpt_worker.model(), iter(batches), ckpt_worker.config())
    expected = sum(int(b["attention_mask"].sum()) for b in batches)
    assert state.n_batches == 5 and state.stop_reason == "data_exhausted"
    assert max(state.group_tokens) == expected
    with pytest.raises(ValueError, match="no valid token reached the target layers"):
        compute_eva_state(ckpt_worker.model(), iter([padding_only]), ckpt_worker.config())


def test_sequences_longer_than_the_model_allows_end_in_a_named_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=8)
    ).eval()
    ids = torch.randint(0, 50, (2, 12))
    with pytest.raises(RuntimeError, match="forward pass failed on batch 1"):
        compute_eva_state(
            model,
            [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
            ckpt_worker.config(),
        )
    assert _hooks(model) == 0


def test_a_layer_that_never_converges_ends_at_max_batches_with_a_warning_naming_it():
    from eva_lora import EvaConfig

    cfg = EvaConfig(rank=4, rho=2.0, tau=0.999999999, max_batches=4)
    with pytest.warns(
        RuntimeWarning,
        match=r"EVA stopped \(max_batches\) after 4 batches before .* "
        r"layer\(s\) converged: \['model.layers.0",
    ):
        state = compute_eva_state(ckpt_worker.model(), ckpt_worker.batches(), cfg)
    assert state.stop_reason == "max_batches" and state.unconverged
