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
    if kind == "gpt2":  # Conv1D layers (weights stored transposed), learned position embeddings
        from transformers import GPT2Config, GPT2LMHeadModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            config = GPT2Config(
                n_embd=32, n_layer=3, n_head=4, vocab_size=helpers.VOCAB, n_positions=64
            )
            return GPT2LMHeadModel(config).eval()
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
        self.embeddings_beside_a_block = False
        self.outer_loads: list[str] = []

    def load(self, root, module, prefix, device, recurse=True):
        super().load(root, module, prefix, device, recurse)
        if recurse:
            self.loads += 1
            self.resident += 1
            self.most = max(self.most, self.resident)
            # the input embeddings are never in memory beside a block
            self.embeddings_beside_a_block |= not root.get_input_embeddings().weight.is_meta
        else:
            self.outer_loads.append(prefix)

    def release(self, module, recurse=True):
        super().release(module, recurse)
        if recurse:
            self.resident -= 1


def from_disk(empty: nn.Module, folder, batches, **options) -> tuple[EvaState, CountingWeights]:
    """Sequential EVA on a model built on the meta device, its weights read from ``folder`` by the
    counting reader."""
    weights = CountingWeights(folder)
    sequential = SequentialOptions(weights=weights, **options)
    state = quiet(
        compute_eva_state, empty, batches, SAME_TOKENS, progress=False, sequential=sequential
    )
    return state, weights


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_weights_on_disk_are_read_one_block_at_a_time_and_give_the_same_state(tmp_path, kind):
    model = build(kind)
    model.save_pretrained(tmp_path / "model")
    batches = helpers.token_batches(helpers.VOCAB, 5)
    empty, _ = empty_model_from_folder(tmp_path / "model")
    assert all(p.is_meta for p in empty.model.layers.parameters())
    offload = tmp_path / "offload"
    state, weights = from_disk(empty, tmp_path / "model", batches, offload=offload)
    assert weights.loads == 3 and weights.most == 1  # three blocks, never two in memory together
    assert all(p.is_meta for p in empty.model.layers.parameters())  # every block dropped again
    # the modules outside the blocks are read when called (the tied head reads the embeddings'
    # tensor again at the end), and never stay: nothing of the model is left in memory
    assert not weights.embeddings_beside_a_block
    assert weights.outer_loads == ["model.embed_tokens", "model.norm", "lm_head"]
    assert all(p.is_meta for p in empty.parameters())
    assert list(offload.iterdir()) == []  # the hidden states on disk are removed at the end
    assert_same_state(quiet(compute_eva_state, model, batches, SAME_TOKENS, progress=False), state)


def load_4bit(folder, quant_type: str) -> nn.Module:
    """The whole model through transformers' own QLoRA loading (the reference)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32
    )
    return quiet(
        AutoModelForCausalLM.from_pretrained, folder, quantization_config=config, device_map="cpu"
    )


@pytest.mark.parametrize(
    "kind,quant_type,per_block", [("llama", "nf4", 7), ("qwen2", "fp4", 7), ("gpt2", "nf4", 4)]
)
def test_a_4bit_base_read_block_by_block_from_disk_gives_the_whole_4bit_models_components(
    tmp_path, kind, quant_type, per_block
):
    pytest.importorskip("bitsandbytes")
    model = build(kind)
    model.save_pretrained(tmp_path / "model")
    batches = helpers.token_batches(helpers.VOCAB, 5)
    empty, _ = empty_model_from_folder(tmp_path / "model", load_in_4bit=quant_type)
    blocks = find_blocks(empty)[1]
    four_bit = [m for m in blocks.modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == per_block * 3 and type(empty.lm_head) is nn.Linear  # as transformers
    state, weights = from_disk(empty, tmp_path / "model", batches)
    assert weights.loads == 3 and weights.most == 1
    # every block dropped again, its layers still 4-bit with their unpacked shapes, and the
    # quantisation state bitsandbytes also keeps on each layer gone with the weight
    assert all(
        m.weight.is_meta and m.weight.shape == (m.out_features, m.in_features) for m in four_bit
    )
    assert all(m.quant_state is None for m in four_bit)
    whole = quiet(
        compute_eva_state,
        load_4bit(tmp_path / "model", quant_type),
        batches,
        SAME_TOKENS,
        progress=False,
    )
    assert_same_state(whole, state)
    # and it is the 4-bit base's answer, not the float one's
    float_state = quiet(compute_eva_state, model, batches, SAME_TOKENS, progress=False)
    with pytest.raises(AssertionError):
        assert_same_state(float_state, state)


def test_tied_modules_read_and_released_one_after_the_other_stay_tied(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "model")
    empty, weights = empty_model_from_folder(tmp_path / "model")
    embed, head = empty.model.embed_tokens, empty.lm_head
    assert embed.weight is head.weight
    for module, name in ((embed, "model.embed_tokens"), (head, "lm_head")):
        weights.load(empty, module, name, torch.device("cpu"), recurse=False)
    assert embed.weight is head.weight and not embed.weight.is_meta  # read once, shared
    weights.release(embed, recurse=False)
    weights.release(head, recurse=False)
    assert embed.weight is head.weight and embed.weight.is_meta  # the same meta parameter again
    weights.load(empty, head, "lm_head", torch.device("cpu"), recurse=False)  # read again
    assert torch.equal(head.weight, model.lm_head.weight)


def test_a_checkpoint_saved_in_4_bits_is_read_block_by_block_and_others_are_refused(
    tmp_path, capsys, tiny_llama_dir
):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eva_lora.app.cli import main
    from eva_lora.disk_weights import prequantized, reads_block_by_block

    assert prequantized(tiny_llama_dir) is None and reads_block_by_block(tiny_llama_dir)
    saved = tmp_path / "nf4"
    quiet(load_4bit(tiny_llama_dir, "nf4").save_pretrained, saved)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(saved)
    assert prequantized(saved) == "bitsandbytes" and reads_block_by_block(saved)
    # the packed weights and their quantisation state, one block at a time: the state of the
    # whole model as from_pretrained loads that folder
    batches = helpers.token_batches(128, 5)
    empty, _ = empty_model_from_folder(saved)
    state, weights = from_disk(empty, saved, batches)
    assert weights.most == 1 and all(p.is_meta for p in empty.model.layers.parameters())
    whole = quiet(AutoModelForCausalLM.from_pretrained, saved, device_map="cpu")
    assert type(whole.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert_same_state(quiet(compute_eva_state, whole, batches, SAME_TOKENS, progress=False), state)
    with pytest.raises(ValueError, match="already quantised .nf4.; load_in_4bit='fp4'"):
        empty_model_from_folder(saved, load_in_4bit="fp4")
    with pytest.raises(ValueError, match="load_in_4bit must be 'nf4' or 'fp4'"):
        empty_model_from_folder(tiny_llama_dir, load_in_4bit="int4")
    # another method: refused with what to pass
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    other = tmp_path / "gptq"
    shutil.copytree(saved, other)
    (other / "config.json").write_text(json.dumps(config))
    assert not reads_block_by_block(other)
    with pytest.raises(ValueError, match="quantised with gptq.*point it at the float checkpoint"):
        empty_model_from_folder(other)
    # eva init --sequential reads the 4-bit folder block by block too
    argv = ["init", "--model", saved, "--task", "gsm8k", "--sequential"]
    argv += ["--data-dir", helpers.ROOT / "tests/assets/data", "--output", tmp_path / "state"]
    argv += ["train_limit=8", "svd_batch_size=4", "max_length=96", "progress=false", "rank=4"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert EvaState.load(tmp_path / "state").n_batches == 2


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


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_eva_init_sequential_reads_the_model_folder_and_saves_the_same_state(
    tmp_path, capsys, tiny_llama_dir, base
):
    from eva_lora.app.cli import main

    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    common = [
        *(["--load-in-4bit"] if base == "nf4" else []),
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
