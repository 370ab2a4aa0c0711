"""EVA beyond token sequences: convolutions (input patches), a fused-qkv vision transformer, a
Decision Transformer, and a real pretrained CNN."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from eva_lora import EvaConfig, apply_eva_state, compute_eva_state
from eva_lora.pca import captured_variance
from eva_lora.statistics import ExactStatistic
from eva_lora.targets import conv_patches
from helpers import hook_count


@contextlib.contextmanager
def quiet():
    """EVA warns when it stops unconverged at max_batches (these tests cap batches on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


CONVS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=5, stride=1, padding=2, dilation=1),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=1, padding="valid"),
]


@pytest.mark.parametrize("settings", CONVS, ids=[str(c) for c in CONVS])
def test_conv_patches_are_exactly_what_the_convolution_reads(settings):
    """conv(x) = patches @ W^T (+ b), position by position: the rows EVA sees are LoRA A's input."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, **settings).double()
    x = torch.randn(2, 4, 9, 11, generator=g, dtype=torch.float64)
    out = conv(x)  # (n, 6, H', W')
    rows = conv_patches(conv, x)
    assert rows.shape == (
        2 * out.shape[2] * out.shape[3],
        4 * conv.kernel_size[0] * conv.kernel_size[1],
    )
    via_rows = rows @ conv.weight.reshape(6, -1).T + conv.bias
    torch.testing.assert_close(via_rows, out.permute(0, 2, 3, 1).reshape(-1, 6), rtol=0, atol=1e-12)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.point = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, pixel_values):
        x = F.relu(self.stem(pixel_values))
        x = F.relu(self.down(x))
        x = F.relu(self.point(x))
        return self.head(x.mean((2, 3)))


def images(n_batches: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 12, 12, generator=g)
    return [
        {"pixel_values": base + 0.5 * torch.randn(4, 3, 12, 12, generator=g)}
        for _ in range(n_batches)
    ]


def cnn(seed: int = 0) -> SmallCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN().eval()


@pytest.mark.parametrize("statistics", ["exact", "sketch"])
def test_conv_eva_matches_the_exact_pca_of_the_same_patches(statistics):
    model, batches = cnn(), images(6)
    cfg = EvaConfig(
        rank=3,
        rho=2.0,
        tau=0.999999,
        max_batches=6,
        target_modules=["stem", "down", "point"],
        statistics=statistics,
        sketch_size=144 if statistics == "sketch" else None,
    )
    with quiet():
        state = compute_eva_state(model, batches, cfg, progress=False)
    assert state.layer_shapes == {"stem": [27, 8], "down": [72, 16], "point": [16, 16]}
    patches = {"stem": [], "down": [], "point": []}
    hooks = [
        getattr(model, n).register_forward_hook(
            lambda m, a, o, n=n: patches[n].append(conv_patches(m, a[0]))
        )
        for n in patches
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    for names, comps, tokens in zip(state.groups, state.group_components, state.group_tokens):
        exact = ExactStatistic(comps.shape[1], dtype=torch.float64)
        for rows in patches[names[0]]:
            exact.update(rows.double())
        assert tokens == exact.count  # every patch of every image: 144, 36, 36 per image
        assert captured_variance(exact.covariance(), comps) >= 0.9999
    assert hook_count(model) == 0


def test_conv_lora_starts_as_the_base_model_and_loads_with_peft(tmp_path):
    from peft import PeftModel

    model, batches = cnn(), images(6)
    cfg = EvaConfig(
        rank=2, rho=2.0, tau=0.99, max_batches=6, target_modules=["stem", "down", "point", "head"]
    )
    with quiet():
        state = compute_eva_state(model, batches, cfg, progress=False)
    with torch.no_grad():
        base = model(**batches[0]).clone()
    peft_model = apply_eva_state(cnn(), state)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batches[0]), base, rtol=0, atol=0)
    for name, rows in state.components.items():
        if rows.shape[0]:
            a = peft_model.base_model.model.get_submodule(name).lora_A["default"].weight
            # a conv's A: (r, C, kh, kw) kernels
            torch.testing.assert_close(a.reshape(a.shape[0], -1), rows)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(cnn(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]), base, rtol=0, atol=0)


def test_fused_qkv_vision_transformer_gets_one_pca_for_its_qkv_layer(tmp_path):
    """transformers' ViTDet has one fused qkv Linear per block. Its input is shared by q, k and v,
    so a per-slice PCA of the input is the same PCA three times: one group, one A (see the
    README)."""
    from peft import PeftModel
    from transformers import VitDetConfig, VitDetModel

    config = VitDetConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
        pretrain_image_size=32,
        num_channels=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VitDetModel(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(5)]
    cfg = EvaConfig(
        rank=4, rho=2.0, tau=0.99, max_batches=5, target_modules=["qkv", "proj", "fc1", "fc2"]
    )
    with quiet():
        state = compute_eva_state(model, batches, cfg, progress=False)
    qkv = [n for n in state.ranks if n.endswith("attention.qkv")]
    assert len(qkv) == 2 and all(state.layer_shapes[n] == [32, 96] for n in qkv)
    # qkv, proj, fc1, fc2: four inputs per block
    assert all(len(names) == 1 for names in state.groups)
    tokens = {n: [] for n in qkv}  # the float64 reference: the exact PCA of every token qkv read
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: tokens[n].append(a[0].reshape(-1, 32))
        )
        for n in qkv
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    for name in qkv:
        index = next(i for i, names in enumerate(state.groups) if names == [name])
        exact = ExactStatistic(32, dtype=torch.float64)
        for rows in tokens[name]:
            exact.update(rows.double())
        assert state.group_tokens[index] == exact.count == 5 * 2 * 16  # 16 patches per image
        assert captured_variance(exact.covariance(), state.group_components[index]) >= 0.999
    with torch.no_grad():
        base = model(**batches[0]).last_hidden_state.clone()
    peft_model = apply_eva_state(model, state)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batches[0]).last_hidden_state, base, rtol=0, atol=0)
    peft_model.save_pretrained(tmp_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = VitDetModel(config).eval()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert {
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    } == {n for n, r in state.ranks.items() if r > 0}


def test_decision_transformer_with_a_token_selector():
    """A Decision Transformer interleaves (return, state, action) tokens: its hidden states are
    (batch, 3 * T, d) while the batch's attention mask is (batch, T). select_tokens keeps the tokens
    of real (unpadded) time steps."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    config = DecisionTransformerConfig(
        state_dim=6, act_dim=3, hidden_size=32, n_layer=2, n_head=4, max_ep_len=50, n_positions=64
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DecisionTransformerModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :4] = 0  # left padding of a short trajectory
        batches.append(
            {
                "states": torch.randn(2, 10, 6, generator=g),
                "actions": torch.randn(2, 10, 3, generator=g),
                "returns_to_go": torch.randn(2, 10, 1, generator=g),
                "timesteps": torch.arange(10).repeat(2, 1),
                "attention_mask": mask,
            }
        )

    # (B, 3T, d): repeat the step mask for the three tokens of each step
    def select(x, batch, name):
        keep = batch["attention_mask"].bool().repeat_interleave(3, dim=1)
        return x[keep] if x.shape[:2] == keep.shape else x.reshape(-1, x.shape[-1])

    cfg = EvaConfig(
        rank=2,
        rho=1.0,
        tau=0.9,
        max_batches=4,
        target_modules=r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)",
    )
    with quiet():
        state = compute_eva_state(model, batches, cfg, select_tokens=select, progress=False)
    # real steps only, three tokens each
    assert state.group_tokens[0] == state.n_batches * 3 * (10 + 6)
    assert set(state.ranks.values()) == {2}


@pytest.mark.slow
def test_pretrained_efficientnet_lite0_loads_strictly_and_its_convs_take_eva():
    pytest.importorskip("sklearn")
    from eva_lora.experiments.vision import digits, load_lite0

    try:
        model = load_lite0(num_classes=10)
    except ValueError as err:
        pytest.skip(str(err))
    x, y = digits(size=32)
    batches = [{"pixel_values": x[i : i + 32]} for i in range(0, 128, 32)]
    cfg = EvaConfig(
        rank=4, rho=2.0, tau=0.99, max_batches=4, target_modules=r".*_(expand|project)_conv"
    )
    with quiet():
        state = compute_eva_state(model, batches, cfg, progress=False)
    # 15 expand + 16 project convs
    assert len(state.ranks) == 31 and sum(state.ranks.values()) == 4 * 31
    assert state.layer_shapes["_blocks.15._project_conv"] == [1152, 320]
