"""Decision making: Meta-World expert demonstrations, the Decision Transformer's windows and loss,
EVA on its interleaved tokens, LoRA / EVA fine-tuning from the exact pre-trained function, rollouts,
and the quick grid.

Tests that step a Meta-World environment skip when Meta-World (the optional ``decision`` extra) is
absent."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from eva_lora import EvaConfig, compute_eva_state
from eva_lora.experiments.decision import (
    ACT_DIM,
    STATE_DIM,
    TARGETS,
    AdapterConfig,
    DecisionPolicy,
    PolicyConfig,
    TrainConfig,
    Trajectory,
    action_loss,
    build_policy,
    collect_demonstrations,
    evaluate_success,
    finetune,
    load_demonstrations,
    load_policy,
    make_windows,
    real_step_tokens,
    sample_windows,
    save_demonstrations,
    save_policy,
    target_return,
    task_env,
)

needs_metaworld = pytest.mark.skipif(
    importlib.util.find_spec("metaworld") is None,
    reason="Meta-World is not installed "
    "(optional extra 'decision': pip install 'eva-lora[decision]')",
)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads wait on each other (20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = PolicyConfig(hidden=32, layers=2, heads=4, context=4, dropout=0.2)


def synthetic(task: str, length: int, offset: float = 0.0) -> Trajectory:
    """A trajectory whose values tell their origin: state t is (t + offset) everywhere, reward 1."""
    steps = torch.arange(length, dtype=torch.float32) + offset
    return Trajectory(
        task,
        steps[:, None].repeat(1, STATE_DIM),
        torch.tanh(steps[:, None].repeat(1, ACT_DIM) / 10),
        torch.ones(length),
        steps >= length - 2,
        "success",
    )


def trajectories() -> list[Trajectory]:
    return [
        synthetic("a-v3", 6),
        synthetic("a-v3", 3, offset=100.0),
        synthetic("b-v3", 9, offset=200.0),
    ]


@needs_metaworld
def test_expert_demonstrations_succeed_stop_after_holding_and_are_deterministic():
    demos = collect_demonstrations(
        ["reach-v3", "handle-press-v3"], 2, seed=0, max_steps=200, hold_steps=5
    )
    assert [t.task for t in demos] == ["reach-v3"] * 2 + ["handle-press-v3"] * 2
    # the scripted experts solve these tasks
    assert sum(t.success for t in demos) / len(demos) == 1.0
    for t in demos:
        first = int(t.successes.nonzero()[0])
        # kept 5 steps past the first success
        assert t.stop_reason == "success" and t.length == first + 5 + 1
        assert t.observations.dtype == torch.float32 and t.actions.abs().max() <= 1.0
    # each episode its own goal
    assert not torch.equal(demos[0].observations[0], demos[1].observations[0])
    again = collect_demonstrations(["reach-v3"], 2, seed=0, max_steps=200, hold_steps=5)
    assert all(
        torch.equal(a.observations, b.observations) and torch.equal(a.actions, b.actions)
        for a, b in zip(demos, again)
    )
    other = collect_demonstrations(["reach-v3"], 1, seed=1, max_steps=10)
    assert other[0].length == 10 and other[0].stop_reason == "max_steps" and not other[0].success
    # another seed, other goals
    assert not torch.equal(other[0].observations[0], demos[0].observations[0])


def test_demonstrations_and_policy_roundtrip_bit_identical_and_detect_a_torn_pair(tmp_path):
    demos = trajectories()
    path = tmp_path / "demos.safetensors"
    save_demonstrations(demos, path, {"settings": {"seed": 3}})
    loaded, meta = load_demonstrations(path)
    assert meta == {"settings": {"seed": 3}} and len(loaded) == 3
    for a, b in zip(demos, loaded):
        assert (a.task, a.stop_reason) == (b.task, b.stop_reason)
        for name in ("observations", "actions", "rewards", "successes"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y)
    save_demonstrations(demos[:1], tmp_path / "other.safetensors")
    # tensors of another save under this index
    path.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ValueError, match="SHA-256"):
        load_demonstrations(path)

    model = build_policy(SMALL, demos, seed=0).eval()
    save_policy(model, tmp_path / "policy.safetensors", {"note": "x"})
    again, info = load_policy(tmp_path / "policy.safetensors")
    batch = make_windows([(demos[0], 5), (demos[2], 1)], SMALL.context)
    assert info == {"note": "x"} and again.config == SMALL
    torch.testing.assert_close(again(**batch), model(**batch), rtol=0, atol=0)
    torch.testing.assert_close(again.state_std, model.state_std, rtol=0, atol=0)


def test_windows_end_at_a_step_are_left_padded_and_the_loss_counts_real_steps_only():
    demos = trajectories()
    batch = make_windows([(demos[0], 1), (demos[0], 5), (demos[1], 2)], context=4)
    assert batch["states"].shape == (3, 4, STATE_DIM) and batch["actions"].shape == (3, 4, ACT_DIM)
    assert batch["returns_to_go"].shape == (3, 4, 1) and batch["timesteps"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch["states"][:, :, 0].tolist() == [[0, 0, 0, 1], [2, 3, 4, 5], [0, 100, 101, 102]]
    assert batch["timesteps"].tolist() == [[0, 0, 0, 1], [2, 3, 4, 5], [0, 0, 1, 2]]
    # reward 1 a step
    assert batch["returns_to_go"][:, :, 0].tolist() == [[0, 0, 6, 5], [4, 3, 2, 1], [0, 3, 2, 1]]
    # padding is zeros
    assert (batch["actions"][0, :2] == 0).all() and (batch["states"][0, :2] == 0).all()
    with pytest.raises(ValueError, match="outside"):
        make_windows([(demos[1], 3)], context=4)

    # MSE over real steps: a wrong prediction on padding changes nothing, on a real step it does
    predicted = batch["actions"].clone()
    predicted[0, 0] += 5.0
    assert action_loss(predicted, batch).item() == 0.0
    predicted[0, 3] += 1.0  # one real step of 4 + 2 + 3 = 9, error 1 on each of its 4 dims
    assert action_loss(predicted, batch).item() == pytest.approx(1 / 9)

    g = torch.Generator().manual_seed(0)
    sampled = sample_windows(demos, 256, 4, g)
    assert (
        sampled["states"].shape == (256, 4, STATE_DIM)
        and (sampled["attention_mask"][:, -1] == 1).all()
    )
    real = sampled["attention_mask"].sum(1)
    # windows near a start are padded
    assert set(real.tolist()) <= {1, 2, 3, 4} and (real < 4).any()
    masks = sampled["attention_mask"]
    assert (masks[:, 1:] >= masks[:, :-1]).all()  # padding only on the left
    sources = (sampled["states"][:, -1, 0] // 100).long()  # which trajectory each window ends in
    counts = torch.bincount(sources, minlength=3).tolist()
    assert counts[2] > counts[0] > counts[1]  # drawn in proportion to length (9 : 6 : 3)


def test_eva_on_the_decision_transformer_counts_three_tokens_per_real_step():
    model = DecisionPolicy(SMALL, torch.zeros(STATE_DIM), torch.ones(STATE_DIM)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [sample_windows(trajectories(), 5, SMALL.context, g) for _ in range(4)]
    real_steps = sum(int(b["attention_mask"].sum()) for b in batches)
    assert real_steps < 4 * 5 * SMALL.context  # some padding, which must not be counted
    cfg = EvaConfig(rank=2, rho=1.0, tau=1.0, max_batches=4, target_modules=TARGETS)
    with warnings.catch_warnings():
        # tau = 1 never converges: all 4 batches are read
        warnings.simplefilter("ignore", RuntimeWarning)
        state = compute_eva_state(
            model, batches, cfg, select_tokens=real_step_tokens, progress=False
        )
    # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert state.n_batches == 4 and len(state.ranks) == 8
    assert state.layer_shapes["dt.encoder.h.0.attn.c_attn"] == [32, 96]
    assert state.layer_shapes["dt.encoder.h.1.mlp.c_proj"] == [128, 32]
    assert list(state.group_tokens) == [3 * real_steps] * len(state.groups)
    # token k of 4 steps: (return, state, action) x 4
    x = torch.arange(12.0).reshape(1, 12, 1).repeat(2, 1, 1)
    kept = real_step_tokens(x, {"attention_mask": torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])}, "x")
    # all three tokens of real steps
    assert kept[:, 0].tolist() == [6, 7, 8, 9, 10, 11, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="not"):
        real_step_tokens(torch.zeros(2, 5, 8), {"attention_mask": torch.ones(2, 2)}, "x")


@pytest.mark.parametrize("init", ["lora", "eva"])
def test_finetuning_starts_from_the_pretrained_function_and_trains_only_the_adapters(init):
    demos = trajectories()
    model = build_policy(SMALL, demos, seed=0).eval()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_windows([(demos[0], 5), (demos[2], 1), (demos[1], 2)], SMALL.context)
    with torch.no_grad():
        expected = model(**batch)
    adapters = AdapterConfig(rank=2, lora_alpha=2.0, rho=2.0, eva_batch_size=8, eva_max_batches=6)
    peft_model, info = finetune(
        model, init, demos, adapters, TrainConfig(steps=0, warmup_steps=1), seed=0
    )
    with torch.no_grad():
        # B = 0: the same function
        torch.testing.assert_close(peft_model(**batch), expected, rtol=0, atol=0)
    layers = {
        n: m
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert set(layers) <= {
        f"base_model.model.dt.encoder.h.{i}.{p}"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert all(not m.lora_B["default"].weight.detach().any() for m in layers.values())
    if init == "eva":
        # budget, rho cap
        assert sum(info["ranks"].values()) == 2 * 8 and max(info["ranks"].values()) <= 4
        a = layers["base_model.model.dt.encoder.h.0.attn.c_attn"].lora_A["default"].weight
        # orthonormal components
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)

    trained, info = finetune(
        model, init, demos, adapters, TrainConfig(steps=3, warmup_steps=1, lr=1e-2), seed=0
    )
    assert info["steps"] == 3 and len(info["losses"]) == 3
    with torch.no_grad():
        assert not torch.equal(trained(**batch), expected)  # the adapters moved
    merged_free = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v
        for k, v in trained.state_dict().items()
        if "lora_" not in k
    }
    # frozen pre-trained weights
    assert all(torch.equal(merged_free[k], v) for k, v in base_weights.items())
    # original untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_weights.items())
    with torch.random.fork_rng(devices=[]):
        # another global RNG state: dropout and LoRA's A must not depend on it
        torch.manual_seed(12345)
        again, _ = finetune(
            model, init, demos, adapters, TrainConfig(steps=3, warmup_steps=1, lr=1e-2), seed=0
        )
    with torch.no_grad():
        # seeded: reproducible
        torch.testing.assert_close(again(**batch), trained(**batch), rtol=0, atol=0)


class ExpertAsPolicy(torch.nn.Module):
    """Acts as the scripted expert on the last state fed to it; records what evaluation feeds it."""

    def __init__(self, task: str, context: int, silent: bool = False) -> None:
        super().__init__()
        from metaworld.policies import ENV_POLICY_MAP

        self.config, self.expert = PolicyConfig(context=context), ENV_POLICY_MAP[task]()
        self.silent, self.fed = silent, []

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        self.fed.append(batch)
        out = torch.zeros(1, self.config.context, ACT_DIM)
        if not self.silent:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                action = self.expert.get_action(batch["states"][0, -1].double().numpy())
                out[0, -1] = torch.from_numpy(np.asarray(action))
        return out


@needs_metaworld
def test_task_goals_built_once_are_those_a_new_mt1_gives_in_a_seeded_order():
    import metaworld

    _, goals = task_env("reach-v3", 7)
    env, again = task_env("reach-v3", 7)  # MT1 read from the per-process cache
    assert [g.data for g in again] == [g.data for g in goals] and len(goals) == 50
    other_env, _ = task_env("reach-v3", 7)
    assert type(other_env) is type(env) and other_env is not env  # a new environment each call
    fresh = metaworld.MT1("reach-v3", seed=7).train_tasks
    assert sorted(g.data for g in goals) == sorted(g.data for g in fresh)
    assert [g.data for g in goals] != [g.data for g in fresh]  # the seeded episode order
    _, other = task_env("reach-v3", 8)
    assert not {g.data for g in other} & {g.data for g in goals}  # another seed, other goals


@needs_metaworld
@pytest.mark.filterwarnings("ignore:Constant:UserWarning")
def test_rollouts_feed_left_padded_contexts_with_returns_to_go_and_count_success_at_any_step():
    expert = ExpertAsPolicy("handle-press-v3", context=3)
    result = evaluate_success(expert, "handle-press-v3", 2, seed=1000, target=50.0, max_steps=150)
    assert result["success_rate"] == 1.0
    # stops at success
    assert all(e["stop_reason"] == "success" and e["steps"] < 150 for e in result["episodes"])
    first = expert.fed[: result["episodes"][0]["steps"]]
    assert [b["attention_mask"].tolist() for b in first[:3]] == [
        [[0, 0, 1]],
        [[0, 1, 1]],
        [[1, 1, 1]],
    ]
    assert [b["timesteps"][0, -1].item() for b in first[:4]] == [0, 1, 2, 3]
    rtg = [b["returns_to_go"][0, -1, 0].item() for b in first]
    # target minus the reward so far
    assert rtg[0] == 50.0 and all(a >= b for a, b in zip(rtg, rtg[1:]))
    # all rewards; the last step's (at most 10) is not yet collected
    collected = result["episodes"][0]["return"]
    assert collected > 1 and 50.0 - collected - 1e-3 <= rtg[-1] <= 50.0 - collected + 10.0
    # the previous action is fed, the current is 0
    assert torch.equal(
        first[1]["actions"][0, 1],
        torch.from_numpy(
            np.clip(
                expert.expert.get_action(first[0]["states"][0, -1].double().numpy()), -1, 1
            ).astype(np.float32)
        ),
    )
    assert (first[1]["actions"][0, -1] == 0).all()
    idle = evaluate_success(
        ExpertAsPolicy("handle-press-v3", 3, silent=True),
        "handle-press-v3",
        1,
        seed=1000,
        target=50.0,
        max_steps=20,
    )
    assert idle["success_rate"] == 0.0 and idle["episodes"][0]["stop_reason"] == "max_steps"
    assert target_return(trajectories(), "a-v3") == 6.0


@pytest.mark.slow
@needs_metaworld
def test_quick_grid_runs_lora_and_eva_in_shards_and_reuses_every_stage(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks/paper_check"))
    import decision

    argv = ["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    record = decision.main(argv)
    assert set(record["runs"]) == {"lora", "eva"} and record["estimated_full_seconds"] > 0
    eva = record["runs"]["eva"]["faucet-close-v3"]
    assert (
        sum(eva[0]["ranks"].values()) == 8 * 12
        and eva[0]["steps"] == 10
        and 0.0 <= eva[0]["success_rate"] <= 1.0
    )
    # other goals in every seed, the same for both inits within a seed
    assert [r["eval_seed"] for r in eva] == [1000, 1001]
    assert [r["eval_seed"] for r in record["runs"]["lora"]["faucet-close-v3"]] == [1000, 1001]
    assert record["demonstrations"]["pretrain"]["reach-v3"]["success_rate"] == 1.0
    text = (tmp_path / "decision.md").read_text()
    assert "| eva |" in text and "nested bootstrap" in text
    stored = json.loads((tmp_path / "decision.json").read_text())
    assert stored["seeds"] == [0, 1]
    assert stored["provenance"]["git_commit"] == eva[0]["git_commit"]
    # what the runs loaded (this test process may hold more: test_paper_check checks that a
    # process lists only what it loaded)
    used = stored["provenance"]["code_files"]
    assert {"src/eva_lora/experiments/decision.py", "src/eva_lora/engine.py"} <= set(used)
    capsys.readouterr()
    again = decision.main(argv)
    # both demonstration sets, the model, all four runs
    assert capsys.readouterr().err.count("reused") == 7
    assert again["runs"] == record["runs"] and again["zero_shot"] == record["zero_shot"]

    # one shard of two: its half of the grid (every other run), no result without the other half;
    # the demonstrations and the pre-trained model are the first grid's (read back, not re-made)
    out = tmp_path / "sharded"
    sharded = ["--quick", "--out", str(out), "--work", str(out / "work")]
    (out / "work" / "quick").mkdir(parents=True)
    for stage in (tmp_path / "work" / "quick").iterdir():
        if "_seed" not in stage.name:
            shutil.copy(stage, out / "work" / "quick" / stage.name)
    assert decision.main([*sharded, "--shard", "1/2"]) is None
    assert "2 run(s) of other shards not there yet" in capsys.readouterr().err
    assert not (out / "decision.json").exists()
    assert len(list((out / "work" / "quick").glob("*_seed*.json"))) == 2
    assembled = decision.main(sharded)  # the other half, then the result
    assert capsys.readouterr().err.count("reused") == 5  # demos x 2, model, the shard's two runs

    # seeded: the same runs however the grid was split
    def outcome(runs):
        return {
            (init, task, r["seed"]): (r["losses"], r["episodes"])
            for init, by_task in runs.items()
            for task, rs in by_task.items()
            for r in rs
        }

    assert outcome(assembled["runs"]) == outcome(record["runs"])
    with pytest.raises(SystemExit, match="K/N"):
        decision.main([*sharded, "--shard", "2"])
    with pytest.raises(SystemExit, match="0 <= K < N"):
        decision.main([*sharded, "--shard", "2/2"])
