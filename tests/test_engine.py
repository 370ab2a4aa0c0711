"""compute_eva_state on tiny models: targets, masking, grouping, convergence, bad input."""

import warnings

import pytest
import torch

from eva_lora import EvaConfig, EvaNotConvergedError, compute_eva_state
from eva_lora.pca import captured_variance
from helpers import exact_stats, hook_count, token_batches

FAST = dict(rank=4, rho=2.0)


def test_llama_groups_qkv_and_gate_up(tiny_llama):
    state = compute_eva_state(tiny_llama, token_batches(101, 6), EvaConfig(max_batches=6, **FAST))
    groups = {tuple(n.split(".")[-1] for n in g) for g in state.groups}
    assert ("q_proj", "k_proj", "v_proj") in groups and ("gate_proj", "up_proj") in groups
    assert len(state.groups) == 2 * 4  # per layer: qkv, o, gate/up, down
    assert "lm_head" not in state.ranks
    assert sum(state.ranks.values()) == 4 * len(state.ranks)
    assert max(state.ranks.values()) <= 8
    for name, comp in state.components.items():
        assert comp.shape == (state.ranks[name], state.layer_shapes[name][0])
    assert hook_count(tiny_llama) == 0


def test_gpt2_conv1d_targets(tiny_gpt2):
    cfg = EvaConfig(target_modules=["c_attn", "c_fc"], max_batches=5, **FAST)
    state = compute_eva_state(tiny_gpt2, token_batches(101, 5), cfg)
    assert sorted(state.ranks) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    assert state.layer_shapes["transformer.h.0.attn.c_attn"] == [32, 96]


def test_regex_targets_and_excludes(tiny_llama):
    cfg = EvaConfig(
        target_modules=r".*\.(q_proj|v_proj)",
        exclude_modules=["layers.1.self_attn.v_proj"],
        max_batches=3,
        **FAST,
    )
    state = compute_eva_state(tiny_llama, token_batches(101, 3), cfg)
    assert sorted(state.ranks) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_rho_one_gives_exactly_uniform_ranks(tiny_bert):
    state = compute_eva_state(
        tiny_bert, token_batches(101, 4), EvaConfig(rank=3, rho=1.0, max_batches=4)
    )
    assert set(state.ranks.values()) == {3}


def test_components_match_exact_pca_of_same_tokens(tiny_llama):
    batches = token_batches(101, 8, batch=4, seq=16)
    cfg = EvaConfig(rank=4, rho=2.0, tau=0.999999, max_batches=8)
    with warnings.catch_warnings():
        # tau this close to 1 never converges: intended
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(tiny_llama, batches, cfg)
    reference = exact_stats(tiny_llama, batches, cfg)
    assert state.n_batches == 8 and state.stop_reason == "max_batches"
    for names, comps, tokens in zip(state.groups, state.group_components, state.group_tokens):
        stats = reference[names[0]]
        assert tokens == stats.count
        assert captured_variance(stats.covariance(), comps) >= 0.999


def test_padding_and_ignored_labels_are_masked(tiny_llama):
    batches = token_batches(101, 2, batch=4, seq=16)  # rows 0 and 2 padded after position 8
    for b in batches:
        labels = b["input_ids"].clone()
        labels[:, :4] = -100
        b["labels"] = labels
    cfg = EvaConfig(max_batches=2, tau=0.5, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        masked = compute_eva_state(tiny_llama, batches, cfg)
        unmasked = compute_eva_state(
            tiny_llama, batches, EvaConfig(**{**cfg.to_dict(), "use_label_mask": False})
        )
    per_batch_valid = 2 * 16 + 2 * 8
    assert unmasked.group_tokens[0] == 2 * per_batch_valid
    assert masked.group_tokens[0] == 2 * (per_batch_valid - 4 * 4)


def test_converges_and_records_history(tiny_bert):
    import time

    batches = token_batches(101, 10, batch=8, seq=16)
    start = time.perf_counter()
    state = compute_eva_state(
        tiny_bert, batches, EvaConfig(rank=2, rho=1.0, tau=0.9, max_batches=200)
    )
    elapsed = time.perf_counter() - start
    assert state.stop_reason == "converged"
    assert state.unconverged == []
    assert state.n_batches < 200 and state.n_batches == state.history[-1]["batch"]
    # a check per batch
    assert [h["batch"] for h in state.history] == list(range(1, state.n_batches + 1))
    last = state.history[-1]
    # rho 1: 2 each
    assert last["converged_components"] == last["needed_components"] == 2 * len(state.groups)
    seconds = [h["seconds"] for h in state.history]
    assert seconds == sorted(seconds) and 0 < seconds[-1] <= elapsed


def test_max_batches_warns_and_strict_raises(tiny_llama):
    cfg = EvaConfig(tau=1.0, max_batches=3, **FAST)
    with pytest.warns(RuntimeWarning, match=r"stopped \(max_batches\) after 3 batches"):
        state = compute_eva_state(tiny_llama, token_batches(101, 2), cfg)
    assert state.n_batches == 3 and state.stop_reason == "max_batches" and state.unconverged
    with pytest.raises(EvaNotConvergedError, match="before"):
        compute_eva_state(tiny_llama, token_batches(101, 2), cfg, strict=True)
    assert hook_count(tiny_llama) == 0


def test_generator_is_consumed_once(tiny_llama):
    gen = (b for b in token_batches(101, 3))
    with pytest.warns(RuntimeWarning, match="data_exhausted"):
        state = compute_eva_state(tiny_llama, gen, EvaConfig(tau=1.0, max_batches=50, **FAST))
    assert state.n_batches == 3 and state.stop_reason == "data_exhausted"


class _TwoInputs(torch.nn.Module):
    """``fast`` reads columns with two dominant directions (its components converge at once);
    ``slow`` reads isotropic noise (its components never settle at tau = 0.9999)."""

    def __init__(self):
        super().__init__()
        self.fast, self.slow = torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fast(x[:, :16]) + self.slow(x[:, 16:])


def _two_speed_model_and_batches():
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _TwoInputs().eval()
    scale = torch.ones(32)
    scale[:2] = torch.tensor([30.0, 20.0])
    return model, [torch.randn(64, 32, generator=g) * scale for _ in range(30)]


def test_delta_stops_once_that_share_of_components_converged():
    """2 of 4 components converge early: delta = 0.5 stops there ("delta").

    delta = 1 runs to max_batches."""
    model, batches = _two_speed_model_and_batches()
    cfg = EvaConfig(rank=2, rho=1.0, tau=0.9999, max_batches=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = compute_eva_state(model, batches, cfg)
        part = compute_eva_state(model, batches, EvaConfig(**{**cfg.to_dict(), "delta": 0.5}))
    assert full.stop_reason == "max_batches" and full.n_batches == 30
    assert part.stop_reason == "delta" and part.n_batches < 10
    last = part.history[-1]
    assert last["converged_components"] >= 0.5 * last["needed_components"]
    assert part.history[-2]["converged_components"] < 0.5 * part.history[-2]["needed_components"]


def test_model_mode_restored(tiny_bert):
    tiny_bert.train()
    compute_eva_state(tiny_bert, token_batches(101, 2), EvaConfig(max_batches=2, tau=0.1, **FAST))
    assert tiny_bert.training


@pytest.mark.parametrize(
    "batches, config, error, match",
    [
        ([], {}, ValueError, "batches is empty"),
        ("tokens", {}, TypeError, "iterable of batches"),
        (None, {"target_modules": ["nope"]}, ValueError, "no module matched"),
        (None, {"target_modules": ["embed_tokens"]}, TypeError, "cannot adapt"),
        ("allmasked", {}, ValueError, "no valid token"),
    ],
)
def test_bad_input_errors_leave_no_hooks(tiny_llama, batches, config, error, match):
    if batches is None:
        batches = token_batches(101, 2)
    elif batches == "allmasked":
        batches = token_batches(101, 2)
        for b in batches:
            b["attention_mask"].zero_()
    elif batches == "tokens":
        batches = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(error, match=match):
        compute_eva_state(tiny_llama, batches, EvaConfig(max_batches=4, **{**FAST, **config}))
    assert hook_count(tiny_llama) == 0


def test_forward_error_and_nan_are_reported(tiny_llama):
    def broken(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match=r"forward pass failed on batch 1 \(probe pass\): boom"):
        compute_eva_state(tiny_llama, token_batches(101, 2), EvaConfig(**FAST), forward_fn=broken)
    assert hook_count(tiny_llama) == 0
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="model.layers.1"):
        compute_eva_state(tiny_llama, token_batches(101, 2), EvaConfig(max_batches=4, **FAST))
    assert hook_count(tiny_llama) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank must be"),
        ({"rho": 0.5}, "rho must be"),
        ({"tau": -0.1}, "tau must be"),
        ({"tau": 1.5}, "tau must be"),
        ({"delta": 0.0}, "delta must be"),
        ({"rank_metric": "x"}, "rank_metric"),
        ({"max_batches": 0}, "max_batches"),
        ({"min_rank": 9, "rank": 4}, "min_rank"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvaConfig(**kwargs)


def test_custom_token_selector_for_other_shapes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6)
    ).eval()
    batches = [torch.randn(3, 5, 2, 12) for _ in range(6)]  # (batch, h, w, dim) "patches"
    calls = []

    def select(x, batch, name):
        calls.append(name)
        return x.reshape(-1, x.shape[-1])[::2]

    state = compute_eva_state(
        model, batches, EvaConfig(rank=2, max_batches=6, tau=0.5), select_tokens=select
    )
    assert state.group_tokens[0] <= 6 * 15 and state.group_tokens[0] % 15 == 0
    assert set(calls) == {"0", "2"}
    assert hook_count(model) == 0


def test_bf16_model_feeds_fp32_statistics(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(model, token_batches(101, 3), EvaConfig(max_batches=3, **FAST))
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in state.group_components)
    norms = torch.linalg.vector_norm(state.group_components[0], dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_statistics_stay_on_device(tiny_llama):
    model = tiny_llama.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(model, token_batches(101, 3), EvaConfig(max_batches=3, **FAST))
    # results are returned on CPU
    assert all(c.device.type == "cpu" for c in state.group_components)
    assert sum(state.ranks.values()) == 4 * len(state.ranks)


def test_early_exit_skips_converged_tail_without_changing_the_result(tiny_llama):
    """Ending passes after the deepest active layer must give bit-identical statistics and state."""
    batches = token_batches(101, 12, batch=4, seq=16)
    calls = []
    handle = tiny_llama.lm_head.register_forward_hook(lambda *a: calls.append(1))
    results = {}
    for early in (False, True):
        calls.clear()
        cfg = EvaConfig(rank=2, rho=1.0, tau=0.9, max_batches=12, early_exit=early)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[early] = (compute_eva_state(tiny_llama, batches, cfg), len(calls))
    handle.remove()
    (slow, full_calls), (fast, cut_calls) = results[False], results[True]
    assert fast.n_batches == slow.n_batches and fast.group_tokens == slow.group_tokens
    for name in slow.ranks:
        torch.testing.assert_close(fast.components[name], slow.components[name], rtol=0, atol=0)
    # With early exit only the probe (one sequence, 16 tokens)
    # reaches the head; without it every pass does.
    assert full_calls == slow.n_batches + 1 and cut_calls == 1
    assert hook_count(tiny_llama) == 0


def test_early_exit_off_when_a_target_layer_runs_twice():
    """Shared weights (a layer called twice per pass) could be cut before their second call."""
    torch.manual_seed(0)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.shared = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.shared(self.first(self.shared(x)))

    model = Tied()
    from eva_lora.capture import ActivationCapture, find_target_layers

    cfg = EvaConfig(rank=2)
    with torch.no_grad(), ActivationCapture(find_target_layers(model, cfg), cfg) as capture:
        capture.set_batch(torch.randn(8, 6))
        model(torch.randn(8, 6))
        capture.finish_probe()
        capture.set_exit_point(True)
        assert capture.single_call is False and capture.exit_layer is None


def test_auto_statistics_are_exact_for_narrow_groups_and_sketches_for_wide_ones(tiny_llama):
    """exact_max_dim=40: the 48-wide down_proj input gets a sketch, the 32-wide groups exact
    moments. A sketch as wide as its group truncates nothing, so every group matches the exact
    PCA."""
    batches = token_batches(101, 8, batch=4, seq=16)
    cfg = EvaConfig(rank=4, rho=2.0, tau=0.999999, max_batches=8, exact_max_dim=40, sketch_size=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(tiny_llama, batches, cfg)
    kinds = {
        names[0].split(".")[-1]: kind for names, kind in zip(state.groups, state.group_statistics)
    }
    assert kinds == {
        "q_proj": "exact",
        "o_proj": "exact",
        "gate_proj": "exact",
        "down_proj": "sketch",
    }
    reference = exact_stats(tiny_llama, batches, cfg)
    for names, comps, tokens in zip(state.groups, state.group_components, state.group_tokens):
        assert tokens == reference[names[0]].count
        # float32 rows
        assert captured_variance(reference[names[0]].covariance(), comps) >= 1 - 1e-5


def test_a_model_compiled_after_the_fact_is_captured_eagerly(tiny_llama):
    """torch.compile(model) skips hooks added after compilation; EVA runs the original module."""
    batches = token_batches(101, 4)
    cfg = EvaConfig(rank=2, rho=1.0, tau=0.5, max_batches=4)
    compiled = torch.compile(tiny_llama, backend="eager")
    compiled(**batches[0])
    fired = []
    handle = tiny_llama.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda *a: fired.append(1)
    )
    compiled(**batches[0])
    handle.remove()
    assert fired == []  # the trap this guards against: the statistics would see nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plain = compute_eva_state(tiny_llama, batches, cfg)
        via_compiled = compute_eva_state(compiled, batches, cfg)
    assert via_compiled.group_tokens == plain.group_tokens and via_compiled.ranks == plain.ranks
    for a, b in zip(via_compiled.group_components, plain.group_components):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert hook_count(tiny_llama) == 0


def test_a_compiled_submodule_is_refused_with_a_clear_error(tiny_llama):
    tiny_llama.model.layers[1] = torch.compile(tiny_llama.model.layers[1], backend="eager")
    with pytest.raises(TypeError, match="compiled with torch.compile"):
        compute_eva_state(tiny_llama, token_batches(101, 2), EvaConfig(**FAST))
    assert hook_count(tiny_llama) == 0


def test_the_probe_runs_on_one_short_sequence_then_every_batch_is_fed_once(tiny_llama):
    """The probe groups the layers on a slice of the first batch (1 sequence, 16 tokens); every
    batch, the first included, is then fed once, with or without a memory budget: bit-identical
    states."""
    batches = token_batches(101, 6, batch=3, seq=24)
    shapes = []
    handle = tiny_llama.lm_head.register_forward_pre_hook(
        lambda m, args: shapes.append(tuple(args[0].shape[:2]))
    )
    states = {}
    for budget in (None, 1000.0):
        shapes.clear()
        cfg = EvaConfig(
            rank=2,
            rho=2.0,
            tau=0.999999,
            max_batches=6,
            early_exit=False,
            statistics_budget_mb=budget,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states[budget] = (compute_eva_state(tiny_llama, batches, cfg), list(shapes))
    handle.remove()
    (local, local_passes), (planned, planned_passes) = states[None], states[1000.0]
    assert local_passes == planned_passes == [(1, 16)] + [(3, 24)] * 6
    assert local.group_tokens == planned.group_tokens and local.n_batches == planned.n_batches == 6
    for a, b in zip(local.group_components, planned.group_components):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_fsdp_model_without_a_process_group_is_refused_with_a_clear_error(tiny_llama, tmp_path):
    """A model sharded with fully_shard whose process group is gone (destroyed, or never started on
    this process) would fail deep inside FSDP; EVA says what is missing instead."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for layer in tiny_llama.model.layers:
            fully_shard(layer)
    finally:
        dist.destroy_process_group()
    fsdp_hooks = hook_count(tiny_llama)  # fully_shard's own
    with pytest.raises(
        ValueError, match="sharded with FSDP but torch.distributed has no process group"
    ):
        compute_eva_state(tiny_llama, token_batches(101, 2), EvaConfig(**FAST))
    assert hook_count(tiny_llama) == fsdp_hooks


@pytest.mark.parametrize("kind", ["exact", "sketch"])
def test_bf16_model_runs_the_whole_engine_against_a_float64_reference(tiny_llama, kind):
    """bf16 activations are cast to float32 in bounded chunks: every group's components capture the
    float64 PCA of the very same (bf16) rows. A sketch as wide as its group truncates nothing."""
    model = tiny_llama.to(torch.bfloat16)
    batches = token_batches(101, 6, batch=4, seq=16)
    cfg = EvaConfig(rank=4, rho=2.0, tau=0.999999, max_batches=6, statistics=kind, sketch_size=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(model, batches, cfg)
    reference = exact_stats(model, batches, cfg)
    assert set(state.group_statistics) == {kind}
    for names, comps, tokens in zip(state.groups, state.group_components, state.group_tokens):
        ref = reference[names[0]]
        assert tokens == ref.count
        cov = ref.covariance()
        # float32 statistics of bf16 rows: the exact moment to 1e-5,
        # the sketch's float32 windows to 1e-4
        assert captured_variance(cov, comps.double()) >= (
            1 - 1e-5 if kind == "exact" else 1 - 1e-4
        ), names[0]
        torch.testing.assert_close(
            state.group_eigenvalues[state.groups.index(names)],
            torch.linalg.eigvalsh(cov).flip(0)[: comps.shape[0]],
            rtol=1e-4,
            atol=1e-6,
        )


def test_passes_compute_no_loss_no_cache_and_never_reach_the_head(tiny_llama):
    """labels only mask tokens (the model never sees them, so never builds a loss), no KV cache is
    built, and after the probe no pass reaches the LM head: no logits, whatever the vocabulary."""
    seen, head_inputs = [], []
    outer = tiny_llama.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True
    )
    head = tiny_llama.lm_head.register_forward_pre_hook(
        lambda m, args: head_inputs.append(args[0].shape)
    )
    batches = token_batches(101, 4, batch=4, seq=16)
    for b in batches:
        b["labels"] = b["input_ids"].clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            compute_eva_state(tiny_llama, batches, EvaConfig(rank=2, max_batches=4, tau=0.999999))
    finally:
        outer.remove(), head.remove()
    assert len(seen) == 5 and all("labels" not in kw for kw in seen)  # probe + 4 batches
    assert tiny_llama.config.use_cache is True  # restored afterwards
    assert len(head_inputs) == 1 and head_inputs[0][:2] == (1, 16)  # only the probe's 16 tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_between_checks_the_loop_never_synchronises_the_gpu(tiny_llama, monkeypatch):
    """Hooks, token selection and statistic updates of the batches between checks run under
    torch.cuda.set_sync_debug_mode("error"): any device-to-host wait raises."""
    from eva_lora.capture import ActivationCapture

    model = tiny_llama.cuda()
    make_hook, set_batch = ActivationCapture._make_hook, ActivationCapture.set_batch

    def strict(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    monkeypatch.setattr(
        ActivationCapture, "_make_hook", lambda self, name: strict(make_hook(self, name))
    )
    monkeypatch.setattr(ActivationCapture, "set_batch", strict(set_batch))
    cfg = EvaConfig(
        rank=4,
        rho=2.0,
        tau=0.999999,
        max_batches=8,
        check_every=4,
        exact_max_dim=40,
        sketch_size=16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(model, token_batches(101, 8), cfg)
    assert set(state.group_statistics) == {"exact", "sketch"} and state.n_batches == 8


class _LowRankAndFlat(torch.nn.Module):
    """Two layers fed separate inputs: one of rank 3 (its group converges in a few batches), one
    of flat spectrum (never converges at this tau), so the first is fed long after converging."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(48, 8)
        self.second = torch.nn.Linear(64, 8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.first(a).sum() + self.second(b).sum()


@pytest.mark.parametrize(
    ("window", "first_openings", "first_refining"), [(8, 4 + 4, 5), (1, 40, 0)]
)
def test_a_converged_sketch_explores_once_per_window_and_a_converging_one_every_batch(
    window, first_openings, first_refining, monkeypatch
):
    """Exploring new directions is a sketch's costliest step. While a group converges its sketch
    explores at every batch; once converged (batch 4 here) but still fed, once per sketch_window
    batches, refining its kept directions in between: batches 5-11 refine, 12 explores, 13-19
    refine, ..., 36 explores, 37-40 refine: 4 + 4 explorations and 5 refining windows over 40
    batches. The group that never converges explores at every batch; the converged group's
    components stay those of the exact PCA."""
    from eva_lora.statistics import SketchStatistic

    openings: dict[int, int] = {}
    refining: dict[int, int] = {}
    open_window, open_refining = SketchStatistic._open_window, SketchStatistic._open_refining

    def counted(self, rows):
        openings[self.dim] = openings.get(self.dim, 0) + 1
        return open_window(self, rows)

    def counted_refining(self, rows):
        refining[self.dim] = refining.get(self.dim, 0) + 1
        return open_refining(self, rows)

    monkeypatch.setattr(SketchStatistic, "_open_window", counted)
    monkeypatch.setattr(SketchStatistic, "_open_refining", counted_refining)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(3, 48, generator=g) * 5
    batches = [
        {
            "a": torch.randn(64, 3, generator=g) @ low + 0.01 * torch.randn(64, 48, generator=g),
            "b": torch.randn(16, 64, generator=g) * torch.linspace(1.0, 0.9, 64),
        }
        for _ in range(40)
    ]
    cfg = EvaConfig(
        rank=4, rho=1.0, tau=0.995, statistics="sketch", sketch_size=8, max_batches=40,
        sketch_window=window,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the second group: max_batches
        state = compute_eva_state(
            _LowRankAndFlat(), batches, cfg, forward_fn=lambda m, b: m(**b), progress=False
        )
    assert state.n_batches == 40 and state.group_stop_batches == [4, None]
    assert openings == {48: first_openings, 64: 40}
    assert refining == ({48: first_refining} if first_refining else {})
    rows = torch.cat([b["a"] for b in batches]).double()
    first = state.group_components[0]
    assert captured_variance(torch.cov(rows.T), first[:3].double()) >= 0.9999
