"""Sequential EVA (one decoder block at a time, weights read from disk) vs the whole-model loop."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from torch import nn

import helpers
from eva_lora import EvaConfig, EvaState, compute_eva_state
from eva_lora.disk_weights import DiskWeights, empty_model_from_folder
from eva_lora.sequential import SequentialOptions, find_blocks

# tau = 1 never converges, so the whole-model loop feeds every group every batch: the same tokens as
# the sequential run's calibration set, so the exact statistics and their components must agree.
SAME_TOKENS = EvaConfig(
    rank=4,
    rho=2.0,
    tau=1.0,
    statistics="exact",
    max_batches=5,
    target_modules="all-linear-and-head",
)


def build(kind: str) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    if kind == "llama":
        return helpers.tiny_llama(layers=3, tie_word_embeddings=True)
    shared = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=helpers.VOCAB,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "qwen2":
            return Qwen2ForCausalLM(Qwen2Config(**shared)).eval()
        # Gemma-3: sliding-window and full attention alternate, so each block gets its own mask
        return Gemma3ForCausalLM(
            Gemma3TextConfig(
                **shared,
                head_dim=8,
                sliding_window=4,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            )
        ).eval()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_same_state(a: EvaState, b: EvaState) -> float:
    """Same groups, same ranks, every component |cos| >= 0.9999; returns the worst |cos|."""
    assert a.ranks == b.ranks
    mine = {tuple(g): c for g, c in zip(a.groups, a.group_components)}
    theirs = {tuple(g): c for g, c in zip(b.groups, b.group_components)}
    assert sorted(mine) == sorted(theirs)
    worst = min(float((mine[k] * theirs[k]).sum(1).abs().min()) for k in mine)
    assert worst >= 0.9999
    assert sorted(a.group_tokens) == sorted(b.group_tokens)
    return worst


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_sequential_gives_the_whole_model_components_on_the_same_tokens(kind):
    model = build(kind)
    batches = helpers.token_batches(helpers.VOCAB, 5)
    whole = quiet(compute_eva_state, model, batches, SAME_TOKENS, progress=False)
    blockwise = quiet(
        compute_eva_state, model, batches, SAME_TOKENS, progress=False, sequential=True
    )
    assert blockwise.n_batches == whole.n_batches == 5
    assert_same_state(whole, blockwise)
    # a target outside the blocks: every block replayed, the head fed
    assert "lm_head" in blockwise.ranks


class CountingWeights(DiskWeights):
    """The real reader, counting how many blocks are in memory at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resident = self.most = self.loads = 0

    def load(self, root, module, prefix, device, recurse=True):
        super().load(root, module, prefix, device, recurse)
        if recurse:
            self.loads += 1
            self.resident += 1
            self.most = max(self.most, self.resident)

    def release(self, module):
        super().release(module)
        self.resident -= 1


def test_weights_on_disk_are_read_one_block_at_a_time_and_give_the_same_state(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "model")
    batches = helpers.token_batches(helpers.VOCAB, 5)
    empty, _ = empty_model_from_folder(tmp_path / "model")
    assert all(p.is_meta for p in empty.model.layers.parameters())
    weights = CountingWeights(tmp_path / "model")
    offload = tmp_path / "offload"
    state = quiet(
        compute_eva_state,
        empty,
        batches,
        SAME_TOKENS,
        progress=False,
        sequential=SequentialOptions(weights=weights, offload=offload),
    )
    assert weights.loads == 3 and weights.most == 1  # three blocks, never two in memory together
    assert all(p.is_meta for p in empty.model.layers.parameters())  # every block dropped again
    assert list(offload.iterdir()) == []  # the hidden states on disk are removed at the end
    assert_same_state(quiet(compute_eva_state, model, batches, SAME_TOKENS, progress=False), state)


def test_sequential_with_the_default_rule_reports_convergence_per_group():
    model = helpers.tiny_llama(layers=2)
    batches = helpers.token_batches(helpers.VOCAB, 12, seq=32)
    config = EvaConfig(rank=4, rho=1.0, statistics="exact", max_batches=12)
    state = quiet(
        compute_eva_state,
        model,
        batches,
        config,
        progress=False,
        sequential=SequentialOptions(calibration_batches=12),
    )
    assert state.n_batches == 12
    stopped = [b for b in state.group_stop_batches if b is not None]
    assert state.stop_reason == (
        "converged" if len(stopped) == len(state.groups) else "data_exhausted"
    )
    assert stopped and all(1 <= b <= 12 for b in stopped)
    assert sum(state.ranks.values()) == 4 * len(state.ranks)


def test_a_model_without_detectable_blocks_is_refused_with_what_to_pass():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="could not find the decoder blocks.*blocks="):
        find_blocks(model)
    with pytest.raises(ValueError, match="not a non-empty nn.ModuleList"):
        find_blocks(model, "0")
    assert find_blocks(helpers.tiny_llama())[0] == "model.layers"


def test_an_offload_folder_without_room_fails_before_writing_anything(tmp_path, monkeypatch):
    import eva_lora.files as files

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    offload = tmp_path / "offload"
    with pytest.raises(
        ValueError, match="not enough free space for the hidden states of 5 calibration batches"
    ):
        quiet(
            compute_eva_state,
            helpers.tiny_llama(),
            helpers.token_batches(helpers.VOCAB, 5),
            SAME_TOKENS,
            progress=False,
            sequential=SequentialOptions(offload=offload),
        )
    assert list(offload.iterdir()) == []


def test_sequential_takes_token_batches_only():
    with pytest.raises(TypeError, match="token batches"):
        compute_eva_state(
            helpers.tiny_llama(),
            [torch.zeros(2, 4, dtype=torch.long)],
            SAME_TOKENS,
            progress=False,
            sequential=True,
        )
    with pytest.raises(ValueError, match="checkpoint_every, resume"):
        compute_eva_state(
            helpers.tiny_llama(),
            helpers.token_batches(helpers.VOCAB, 1),
            SAME_TOKENS,
            sequential=True,
            forward_fn=lambda m, b: m(**b),
        )


def test_eva_init_sequential_reads_the_model_folder_and_saves_the_same_state(
    tmp_path, capsys, tiny_llama_dir
):
    from eva_lora.app.cli import main

    common = [
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        helpers.ROOT / "tests/assets/data",
        "train_limit=16",
        "svd_batch_size=4",
        "max_length=96",
        "progress=false",
        "rank=4",
        "eva.statistics=exact",
        "eva.tau=1.0",
        "eva.max_batches=4",
    ]
    outs = {}
    for mode in ("whole", "sequential"):
        outs[mode] = tmp_path / mode
        argv = ["init", *common, "--output", outs[mode]] + (
            ["--sequential", "--offload", tmp_path / "off"] if mode == "sequential" else []
        )
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert_same_state(EvaState.load(outs["whole"]), EvaState.load(outs["sequential"]))
    assert json.loads((outs["sequential"] / "eva_state.json").read_text())["n_batches"] == 4


class CrashingWeights(CountingWeights):
    """The real reader, failing when asked for the block named ``crash_at`` (a killed run)."""

    crash_at = "model.layers.2"

    def load(self, root, module, prefix, device, recurse=True):
        if prefix == self.crash_at:
            raise RuntimeError("killed")
        super().load(root, module, prefix, device, recurse)


def test_a_crashed_sequential_run_resumes_at_the_first_unfinished_block(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "model")
    batches = helpers.token_batches(helpers.VOCAB, 5)
    checkpoint = tmp_path / "ckpt"
    empty, _ = empty_model_from_folder(tmp_path / "model")
    with pytest.raises(RuntimeError, match="killed"):
        quiet(
            compute_eva_state,
            empty,
            batches,
            SAME_TOKENS,
            progress=False,
            sequential=SequentialOptions(
                weights=CrashingWeights(tmp_path / "model"), checkpoint_dir=checkpoint
            ),
        )
    assert sorted(p.name for p in checkpoint.glob("block-*.json")) == [
        "block-0.json",
        "block-1.json",
    ]
    # block 2's may be half written: resume redoes it
    outputs = {p.name for p in checkpoint.glob("outputs-*")}
    # block 0's went when block 1 was committed
    assert "outputs-1" in outputs and "outputs-0" not in outputs
    with pytest.raises(ValueError, match="holds a sequential EVA checkpoint"):
        compute_eva_state(
            empty,
            batches,
            SAME_TOKENS,
            progress=False,
            sequential=SequentialOptions(
                weights=CountingWeights(tmp_path / "model"), checkpoint_dir=checkpoint
            ),
        )
    with pytest.raises(ValueError, match="calibration_sha256"):
        compute_eva_state(
            empty,
            helpers.token_batches(helpers.VOCAB, 5, seed=1),
            SAME_TOKENS,
            progress=False,
            sequential=SequentialOptions(
                weights=CountingWeights(tmp_path / "model"), checkpoint_dir=checkpoint, resume=True
            ),
        )
    weights = CountingWeights(tmp_path / "model")
    resumed = quiet(
        compute_eva_state,
        empty,
        batches,
        SAME_TOKENS,
        progress=False,
        sequential=SequentialOptions(weights=weights, checkpoint_dir=checkpoint, resume=True),
    )
    assert weights.loads == 1  # blocks 0 and 1 were taken from the checkpoint
    whole = quiet(compute_eva_state, model, batches, SAME_TOKENS, progress=False)
    assert_same_state(whole, resumed)
    assert resumed.token_counts == whole.token_counts


def test_eva_init_sequential_commits_blocks_and_resumes(tmp_path, capsys, tiny_llama_dir):
    from eva_lora.app.cli import main

    argv = [
        "init",
        "--model",
        tiny_llama_dir,
        "--task",
        "gsm8k",
        "--data-dir",
        helpers.ROOT / "tests/assets/data",
        "train_limit=16",
        "svd_batch_size=4",
        "max_length=96",
        "progress=false",
        "rank=4",
        "eva.max_batches=4",
        "--output",
        tmp_path / "state",
        "--sequential",
        "--checkpoint-every",
        "1",
        "--no-adapter",
    ]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    ckpt = tmp_path / "state.ckpt"
    assert sorted(p.name for p in ckpt.glob("block-*.json")) == ["block-0.json", "block-1.json"]
    first = EvaState.load(tmp_path / "state")
    assert main([str(a) for a in [*argv, "--resume"]]) == 0, capsys.readouterr().err
    assert_same_state(first, EvaState.load(tmp_path / "state"))
