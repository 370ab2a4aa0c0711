"""EvaState files and the bridge into PEFT."""

import json
import warnings

import pytest
import torch

from eva_lora import (
    EvaConfig,
    EvaState,
    StateFileError,
    apply_eva_state,
    compute_eva_state,
    initial_lora_a,
    peft_a_rows,
    state_from_peft_state_dict,
)
from eva_lora.state import META_FILE, TENSOR_FILE
from helpers import token_batches


@pytest.fixture
def llama_state(tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return compute_eva_state(
            tiny_llama, token_batches(101, 4), EvaConfig(rank=4, rho=2.0, max_batches=4)
        )


def test_save_load_round_trip(llama_state, tmp_path):
    llama_state.save(tmp_path / "s")
    loaded = EvaState.load(tmp_path / "s")
    assert loaded.ranks == llama_state.ranks and loaded.groups == llama_state.groups
    assert loaded.config == llama_state.config
    for name in loaded.ranks:
        assert torch.equal(loaded.components[name], llama_state.components[name])
    assert loaded.model_fingerprint == llama_state.model_fingerprint
    assert loaded.history == llama_state.history and loaded.versions["torch"] == torch.__version__
    # no temp left
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [META_FILE, TENSOR_FILE]


def test_load_rejects_truncated_foreign_and_missing(llama_state, tmp_path):
    d = llama_state.save(tmp_path / "s")
    data = (d / TENSOR_FILE).read_bytes()
    (d / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match="checksum"):
        EvaState.load(d)
    (d / META_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(StateFileError, match="not an eva-lora state"):
        EvaState.load(d)
    (d / META_FILE).write_text('{"format": "eva-lora-sta')
    with pytest.raises(StateFileError, match="not valid JSON"):
        EvaState.load(d)
    with pytest.raises(StateFileError, match="not found"):
        EvaState.load(tmp_path / "nowhere")


def test_load_rejects_inconsistent_ranks(llama_state, tmp_path):
    d = llama_state.save(tmp_path / "s")
    meta = json.loads((d / META_FILE).read_text())
    first = next(iter(meta["ranks"]))
    meta["ranks"][first] = 999
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StateFileError, match="does not match its own checksum"):
        EvaState.load(d)
    from eva_lora.files import manifest_digest

    # re-signed but inconsistent: still fails
    meta["meta_sha256"] = manifest_digest(meta, "meta_sha256")
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StateFileError, match="rank 999 outside"):
        EvaState.load(d)


def test_apply_matches_base_outputs_and_components(tiny_llama, llama_state):
    batch = token_batches(101, 1)[0]
    with torch.no_grad():
        base_logits = tiny_llama(**batch).logits.clone()
    peft_model = apply_eva_state(tiny_llama, llama_state, lora_alpha=1.0)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, base_logits, atol=1e-6)
    for name, rank in llama_state.ranks.items():
        layer = peft_model.base_model.model.get_submodule(name)
        if rank == 0:
            assert not hasattr(layer, "lora_A")
            continue
        assert torch.allclose(layer.lora_A["default"].weight, llama_state.components[name])
        assert layer.lora_B["default"].weight.abs().max() == 0
        # adjust_alpha keeps alpha / r fixed
        assert layer.scaling["default"] == pytest.approx(1.0 / 4)


def test_rslora_alpha_adjustment(tiny_llama, llama_state):
    peft_model = apply_eva_state(tiny_llama, llama_state, lora_alpha=2.0, use_rslora=True)
    for name, rank in llama_state.ranks.items():
        if rank:
            scaling = peft_model.base_model.model.get_submodule(name).scaling["default"]
            assert scaling == pytest.approx(2.0 / 4**0.5)


def test_dora_and_reload_reproduce_outputs(tiny_llama, llama_state, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    batch = token_batches(101, 1, seed=3)[0]
    with torch.no_grad():
        base = tiny_llama(**batch).logits.clone()
    config = tiny_llama.config
    base_weights = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    peft_model = apply_eva_state(tiny_llama, llama_state, use_dora=True)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, base, atol=1e-5)
        # train-like change so reload is non-trivial
        for name, module in peft_model.named_modules():
            if name.endswith("lora_B.default"):
                module.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        tuned = peft_model(**batch).logits.clone()
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = LlamaForCausalLM(config).eval()
    fresh.load_state_dict(base_weights)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, tuned, atol=1e-5)
    assert not torch.allclose(tuned, base, atol=1e-4)


def test_state_for_another_model_is_refused(llama_state, tiny_gpt2, tiny_llama):
    with pytest.raises(
        ValueError, match="computed for another model: layer 'model.layers.0.self_attn.q_proj'"
    ):
        apply_eva_state(tiny_gpt2, llama_state)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=101,
        )
    )
    with pytest.raises(ValueError, match=r"q_proj has shape \[in=48"):
        apply_eva_state(wider, llama_state)
    assert not hasattr(wider, "peft_config")


def test_peft_state_dict_round_trip_and_peft_loader(tiny_llama, llama_state):
    from peft import LoraConfig, get_peft_model, initialize_lora_eva_weights

    sd = peft_a_rows(llama_state)
    assert all(k.startswith("base_model.model.") for k in sd)
    back = state_from_peft_state_dict(sd, layer_shapes=llama_state.layer_shapes)
    assert {n: r for n, r in back.ranks.items()} == {
        n: r for n, r in llama_state.ranks.items() if r > 0
    }
    cfg = LoraConfig(
        r=4, lora_alpha=1, target_modules=sorted(llama_state.ranks), init_lora_weights="eva"
    )
    peft_model = get_peft_model(tiny_llama, cfg)
    initialize_lora_eva_weights(peft_model, eva_state_dict=dict(sd))
    for name, rank in llama_state.ranks.items():
        if rank:
            weight = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
            assert torch.allclose(weight, llama_state.components[name])


def test_ablation_modes(llama_state):
    base = initial_lora_a(llama_state)
    name = next(n for n, r in llama_state.ranks.items() if r >= 2)
    a = base[name]
    for mode in ("perm", "rot", "redist_only"):
        llama_state.config = EvaConfig(**{**llama_state.config.to_dict(), "init_mode": mode})
        out = initial_lora_a(llama_state)[name]
        assert out.shape == a.shape and not torch.allclose(out, a)
        if mode == "perm":
            assert torch.allclose(out.sort(dim=1).values, a.sort(dim=1).values)
        if mode == "rot":
            assert torch.allclose(out @ out.T, a @ a.T, atol=1e-5)  # rows stay orthonormal
        assert torch.equal(out, initial_lora_a(llama_state)[name])  # seeded
    llama_state.config = EvaConfig(
        **{**llama_state.config.to_dict(), "init_mode": "eva", "whiten": True}
    )
    white = initial_lora_a(llama_state)[name]
    values = llama_state.eigenvalues[name][: a.shape[0]]
    assert torch.allclose(white * values.sqrt().float().unsqueeze(1), a, atol=1e-5)
