"""Decision making at small scale: a Decision Transformer pre-trained on Meta-World expert
demonstrations, then fine-tuned with LoRA or EVA on held-out tasks (the paper's CW10 setting, shrunk
to a CPU).

The pieces, and why they look the way they do:

- :func:`collect_demonstrations` rolls out Meta-World's scripted experts (``metaworld.policies``).
  Each task's goals are Meta-World's own 50 goal variations of ``metaworld.MT1(task, seed)``,
  visited in a seeded order, so a seed names the data exactly; an evaluation with another seed sees
  other goals. Episodes stop a few steps after the first success (the rest of a 500-step episode is
  the arm holding still, which costs time and teaches nothing) or at ``max_steps``; every stop says
  why.
- Demonstrations and models are stored as safetensors + a JSON sidecar (never pickle), written
  atomically; the JSON holds the safetensors file's SHA-256, so a torn or mismatched pair fails to
  load.
- :class:`DecisionPolicy` wraps ``transformers.DecisionTransformerModel`` and stores what turns raw
  observations and returns into its inputs (state mean / std of the pre-training data, the return
  scale), so a saved model is self-contained and a fine-tuned one normalises exactly as it was
  trained.
- :func:`sample_windows` cuts windows of ``K`` steps that *end* at a uniformly drawn step,
  left-padded with ``attention_mask = 0``: the same contexts the policy sees when it acts (at step
  ``t < K - 1`` it has ``t + 1`` real steps). The loss is the MSE of the (tanh) action on real steps
  only.
- :func:`finetune` trains LoRA adapters only (the pre-trained weights stay frozen). ``"lora"`` is
  PEFT's default initialisation (random ``A``, ``B = 0``); ``"eva"`` computes ``A`` from the PCA of
  each target layer's inputs on the fine-tuning windows, keeping only the tokens of real steps
  (three per step: return, state, action), and redistributes ranks. Both see the same training
  windows and dropout draws.
- :func:`evaluate_success` rolls the policy out, conditioned on a target return; an episode succeeds
  when ``info["success"]`` is set at any step (it stops there: later steps cannot change the
  outcome).

Speed: these matrices are small; on a shared 2-core machine ``torch.set_num_threads(1)`` runs them
3-20x faster than two threads that wait on each other (the benchmark script sets it; this module
does not).

Needs the ``recipes`` extra (transformers, PEFT) and ``metaworld`` (the ``decision`` extra) for
anything that touches an environment; building, batching and training work without it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from eva_lora import EvaConfig, apply_eva_state, compute_eva_state
from eva_lora.files import read_pair, write_pair

STATE_DIM, ACT_DIM = 39, 4  # Meta-World v3 observation and action widths (every task)
META_WORLD_MAX_STEPS = 500  # Meta-World's episode length: an environment refuses steps beyond it
# GPT-2 blocks of the DT: fused qkv, attention output, MLP in and out (transformers' Conv1D layers).
TARGETS = r".*\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
DEMO_FORMAT, MODEL_FORMAT, FORMAT_VERSION = "eva-lora-demonstrations", "eva-lora-decision-policy", 2
Init = Literal["lora", "eva"]


# --------------------------------------------------------------------------------------------------
# Demonstrations


@dataclass(frozen=True)
class Trajectory:
    """One episode: what the agent saw and did, step by step.

    ``actions`` are the actions the environment executed (clipped to [-1, 1], noise included), so
    the observations follow from them; ``successes[t]`` is ``info["success"]`` after step ``t``.
    """

    task: str
    observations: torch.Tensor  # (T, 39) float32
    actions: torch.Tensor  # (T, 4) float32
    rewards: torch.Tensor  # (T,) float32
    successes: torch.Tensor  # (T,) bool
    # "success" (held after the first success), "max_steps", "truncated", "terminated"
    stop_reason: str

    def __post_init__(self) -> None:
        n = len(self.observations)
        shapes = {
            "observations": (n, STATE_DIM),
            "actions": (n, ACT_DIM),
            "rewards": (n,),
            "successes": (n,),
        }
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"trajectory {name} has shape {tuple(getattr(self, name).shape)}, expected "
                    f"{shape}"
                )
        if n == 0:
            raise ValueError("a trajectory needs at least one step")

    @property
    def length(self) -> int:
        return len(self.observations)

    @property
    def success(self) -> bool:
        return bool(self.successes.any())

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())

    def returns_to_go(self) -> torch.Tensor:
        """(T,) float32: reward still to come from each step on (the DT's conditioning signal)."""
        return torch.flip(torch.cumsum(torch.flip(self.rewards.double(), [0]), 0), [0]).float()


def _task_seed(seed: int, task: str) -> list[int]:
    """An RNG seed per (seed, task): stable when tasks are added, removed or reordered."""
    return [seed, zlib.crc32(task.encode())]


def _check_max_steps(max_steps: int) -> None:
    if not 1 <= max_steps <= META_WORLD_MAX_STEPS:
        raise ValueError(
            f"max_steps must be in [1, {META_WORLD_MAX_STEPS}] (Meta-World's episode length), "
            f"got {max_steps}"
        )


def _metaworld() -> Any:
    """The ``metaworld`` module, or an ImportError that says which extra installs it."""
    try:
        import metaworld
        import metaworld.policies  # noqa: F401  (the scripted experts)
    except ImportError as err:
        raise ImportError("Meta-World is needed here: pip install 'eva-lora[decision]'") from err
    return metaworld


def task_env(task: str, seed: int) -> tuple[Any, list[Any]]:
    """(environment, goals in episode order): the 50 goals of ``MT1(task, seed)`` in a seeded order.

    Episode ``i`` uses ``goals[i % 50]`` (``env.set_task(goal)`` then ``env.reset()``); the same
    seed gives the same goals, another seed other goals (how evaluation avoids the demonstrations'
    goals)."""
    env_class, goals = _mt1(task, seed)
    order = np.random.default_rng(_task_seed(seed, task)).permutation(len(goals))
    return env_class(), [goals[i] for i in order]


@functools.cache
def _mt1(task: str, seed: int) -> tuple[type, tuple[Any, ...]]:
    """(environment class, the 50 goals) of ``MT1(task, seed)``, built once per process.

    Building MT1 resets an environment for each of its 50 goals (~1 s); a grid asks for the same
    task and seed once per run. The goals are immutable records and their draws are seeded (MT1
    seeds NumPy's global RNG for them and restores it): the cached goals are those a new MT1 gives.
    """
    benchmark = _metaworld().MT1(task, seed=seed)
    return benchmark.train_classes[task], tuple(benchmark.train_tasks)


def _rollout(
    env: Any,
    goal: Any,
    act: Callable[[np.ndarray, int, list[float]], np.ndarray],
    max_steps: int,
    hold_steps: int,
) -> tuple[list[np.ndarray], list[np.ndarray], list[float], list[bool], str]:
    """One episode with ``act(obs, step, rewards_so_far)``; at most ``max_steps`` steps.

    Stops ``hold_steps`` steps after the first success ("success"), when the environment ends the
    episode ("terminated" / "truncated"), or after ``max_steps`` steps ("max_steps")."""
    env.set_task(goal)
    obs, _ = env.reset()
    observations, actions, rewards, successes = [], [], [], []
    first_success: int | None = None
    for step in range(max_steps):
        action = np.clip(np.asarray(act(obs, step, rewards), dtype=np.float32), -1.0, 1.0)
        observations.append(np.asarray(obs, dtype=np.float32))
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(float(reward))
        successes.append(bool(info["success"]))
        if successes[-1] and first_success is None:
            first_success = step
        if first_success is not None and step - first_success >= hold_steps:
            return observations, actions, rewards, successes, "success"
        if terminated or truncated:
            return (
                observations,
                actions,
                rewards,
                successes,
                "terminated" if terminated else "truncated",
            )
    return observations, actions, rewards, successes, "max_steps"


def _expert(
    policy: Any, noise: np.random.Generator, action_noise: float
) -> Callable[..., np.ndarray]:
    """A scripted expert as an actor, plus Gaussian noise of std ``action_noise`` when > 0.

    The noise is drawn from ``noise``."""

    def act(obs: np.ndarray, step: int, rewards: list[float]) -> np.ndarray:
        action = policy.get_action(obs)
        return (
            action + noise.normal(0.0, action_noise, size=ACT_DIM) if action_noise > 0 else action
        )

    return act


def collect_demonstrations(
    tasks: Sequence[str],
    episodes: int,
    seed: int,
    max_steps: int = 200,
    hold_steps: int = 10,
    action_noise: float = 0.0,
) -> list[Trajectory]:
    """``episodes`` expert episodes per task (Meta-World's scripted policies), in task order.

    Deterministic in (tasks, episodes, seed, max_steps, hold_steps, action_noise): goals come from
    ``MT1(task, seed)`` in a seeded order (cycled past 50 episodes), and the optional Gaussian
    action noise (std ``action_noise``, added before clipping; it widens the states a policy learns
    from) from a seeded generator. An episode stops ``hold_steps`` steps after its first success or
    at ``max_steps``.
    """
    experts = _metaworld().policies.ENV_POLICY_MAP
    _check_max_steps(max_steps)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    trajectories = []
    for task in tasks:
        if task not in experts:
            raise ValueError(
                f"no scripted expert for {task!r}; Meta-World has: {', '.join(sorted(experts))}"
            )
        env, goals = task_env(task, seed)
        act = _expert(
            experts[task](), np.random.default_rng(_task_seed(seed + 1, task)), action_noise
        )
        with warnings.catch_warnings():  # the experts warn that their gains exceed the action range
            warnings.simplefilter("ignore", UserWarning)
            for episode in range(episodes):
                obs, actions, rewards, successes, reason = _rollout(
                    env, goals[episode % len(goals)], act, max_steps, hold_steps
                )
                trajectories.append(
                    Trajectory(
                        task,
                        torch.from_numpy(np.stack(obs)),
                        torch.from_numpy(np.stack(actions)),
                        torch.tensor(rewards, dtype=torch.float32),
                        torch.tensor(successes, dtype=torch.bool),
                        reason,
                    )
                )
        env.close()
    return trajectories


def save_demonstrations(
    trajectories: Sequence[Trajectory], path: str | Path, meta: dict[str, Any] | None = None
) -> None:
    """``path`` (safetensors: every tensor) + ``path.with_suffix('.json')`` (tasks, stop reasons,
    meta, SHA-256), as an :func:`eva_lora.files.write_pair`: a crash between the two writes, or a
    JSON paired with another tensors file, is caught by :func:`load_demonstrations`."""
    path = Path(path)
    tensors = {}
    for i, t in enumerate(trajectories):
        for name in ("observations", "actions", "rewards", "successes"):
            tensors[f"{i}.{name}"] = getattr(t, name)
    write_pair(
        path,
        tensors,
        path.with_suffix(".json"),
        {
            "meta": meta or {},
            "trajectories": [
                {"task": t.task, "length": t.length, "stop_reason": t.stop_reason}
                for t in trajectories
            ],
        },
        format_name=DEMO_FORMAT,
        version=FORMAT_VERSION,
    )


def load_demonstrations(path: str | Path) -> tuple[list[Trajectory], dict[str, Any]]:
    """(trajectories, meta) saved by :func:`save_demonstrations`; raises on a mismatched pair."""
    index, tensors = read_pair(
        Path(path).with_suffix(".json"),
        format_name=DEMO_FORMAT,
        version=FORMAT_VERSION,
        what="a demonstrations file",
    )
    trajectories = [
        Trajectory(
            entry["task"],
            *(
                tensors[f"{i}.{name}"]
                for name in ("observations", "actions", "rewards", "successes")
            ),
            entry["stop_reason"],
        )
        for i, entry in enumerate(index["trajectories"])
    ]
    return trajectories, index["meta"]


def target_return(trajectories: Sequence[Trajectory], task: str) -> float:
    """The return a rollout of ``task`` is conditioned on: the task's best demonstrated return."""
    returns = [t.episode_return for t in trajectories if t.task == task]
    if not returns:
        raise ValueError(f"no demonstrations of {task!r}")
    return max(returns)


# --------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class PolicyConfig:
    """The Decision Transformer's size and input scaling (the paper's is 4 layers, 8 heads, 512
    wide, K = 50).

    ``return_scale`` divides returns-to-go so they are O(1) (Meta-World pays up to 10 per step).
    ``min_state_std`` floors the per-dimension std: a dimension that is constant in the pre-training
    tasks (an unused object slot) may move in a held-out task, and a tiny std would blow it up.
    """

    hidden: int = 64
    layers: int = 3
    heads: int = 4
    context: int = 10
    dropout: float = 0.2
    max_ep_len: int = META_WORLD_MAX_STEPS
    return_scale: float = 1000.0
    min_state_std: float = 0.05


class DecisionPolicy(nn.Module):
    """A Decision Transformer plus the state normalisation and return scale it was trained with.

    ``forward`` takes raw observations and raw returns-to-go, shape (B, T, 39) and (B, T, 1), with
    actions (B, T, 4), timesteps (B, T) and attention_mask (B, T); it returns the predicted actions
    (B, T, 4) in [-1, 1] (tanh). The prediction at step t reads the tokens up to the state of
    step t.
    """

    def __init__(
        self, config: PolicyConfig, state_mean: torch.Tensor, state_std: torch.Tensor
    ) -> None:
        super().__init__()
        from transformers import DecisionTransformerConfig, DecisionTransformerModel

        self.config = config
        dt_config = DecisionTransformerConfig(
            state_dim=STATE_DIM,
            act_dim=ACT_DIM,
            hidden_size=config.hidden,
            n_layer=config.layers,
            n_head=config.heads,
            n_inner=4 * config.hidden,
            max_ep_len=config.max_ep_len,
            n_positions=3 * config.context,
            action_tanh=True,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=None,
            eos_token_id=None,
        )
        self.dt = DecisionTransformerModel(dt_config)
        self.register_buffer("state_mean", state_mean.detach().float().clone())
        self.register_buffer(
            "state_std", state_std.detach().float().clamp_min(config.min_state_std)
        )

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        returns_to_go: torch.Tensor,
        timesteps: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        out = self.dt(
            states=(states - self.state_mean) / self.state_std,
            actions=actions,
            returns_to_go=returns_to_go / self.config.return_scale,
            timesteps=timesteps,
            attention_mask=attention_mask,
            return_dict=True,
        )
        return out.action_preds


def state_statistics(trajectories: Sequence[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of every observation of ``trajectories``, per dimension (float64 sums)."""
    obs = torch.cat([t.observations for t in trajectories]).double()
    return obs.mean(0).float(), obs.std(0).float()


def build_policy(
    config: PolicyConfig, trajectories: Sequence[Trajectory], seed: int
) -> DecisionPolicy:
    """A fresh policy (seeded, global RNG untouched), normalised by ``trajectories``' states."""
    mean, std = state_statistics(trajectories)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DecisionPolicy(config, mean, std)


def save_policy(
    model: DecisionPolicy, path: str | Path, info: dict[str, Any] | None = None
) -> None:
    """``path`` (safetensors: weights and normalisation buffers) + ``path.with_suffix('.json')``
    (config, info, SHA-256), as an :func:`eva_lora.files.write_pair`."""
    path = Path(path)
    write_pair(
        path,
        model.state_dict(),
        path.with_suffix(".json"),
        {"config": dataclasses.asdict(model.config), "info": info or {}},
        format_name=MODEL_FORMAT,
        version=FORMAT_VERSION,
    )


def load_policy(path: str | Path) -> tuple[DecisionPolicy, dict[str, Any]]:
    """(policy in eval mode, info) saved by :func:`save_policy`; strict: every weight must match."""
    index, tensors = read_pair(
        Path(path).with_suffix(".json"),
        format_name=MODEL_FORMAT,
        version=FORMAT_VERSION,
        what="a decision policy file",
    )
    model = DecisionPolicy(
        PolicyConfig(**index["config"]), tensors["state_mean"], tensors["state_std"]
    )
    model.load_state_dict(tensors, strict=True)
    return model.eval(), index["info"]


# --------------------------------------------------------------------------------------------------
# Batches and loss


def sample_windows(
    trajectories: Sequence[Trajectory], batch_size: int, context: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``batch_size`` windows of ``context`` steps ending at uniformly drawn steps of all the data.

    A trajectory is drawn with probability proportional to its length, then its last step ``e``
    uniformly: the window is steps ``max(0, e - K + 1) .. e``, left-padded to ``K`` with zeros and
    ``attention_mask = 0`` (exactly the context a rollout has at step ``e``). Keys: states
    (B, K, 39), actions (B, K, 4), returns_to_go (B, K, 1), timesteps (B, K) long, attention_mask
    (B, K) long.
    """
    lengths = torch.tensor([t.length for t in trajectories], dtype=torch.float64)
    which = torch.multinomial(lengths, batch_size, replacement=True, generator=generator)
    ends = (
        torch.rand(batch_size, generator=generator, dtype=torch.float64) * lengths[which]
    ).long()
    return make_windows(
        [(trajectories[i], int(e)) for i, e in zip(which.tolist(), ends.tolist())], context
    )


def make_windows(spans: Sequence[tuple[Trajectory, int]], context: int) -> dict[str, torch.Tensor]:
    """Windows of ``context`` steps ending at (trajectory, last step), left-padded (see
    :func:`sample_windows`)."""
    n = len(spans)
    out = {
        "states": torch.zeros(n, context, STATE_DIM),
        "actions": torch.zeros(n, context, ACT_DIM),
        "returns_to_go": torch.zeros(n, context, 1),
        "timesteps": torch.zeros(n, context, dtype=torch.long),
        "attention_mask": torch.zeros(n, context, dtype=torch.long),
    }
    for row, (t, end) in enumerate(spans):
        if not 0 <= end < t.length:
            raise ValueError(f"window end {end} outside a trajectory of {t.length} steps")
        start = max(0, end - context + 1)
        real = end - start + 1
        out["states"][row, -real:] = t.observations[start : end + 1]
        out["actions"][row, -real:] = t.actions[start : end + 1]
        out["returns_to_go"][row, -real:, 0] = t.returns_to_go()[start : end + 1]
        out["timesteps"][row, -real:] = torch.arange(start, end + 1)
        out["attention_mask"][row, -real:] = 1
    return out


def action_loss(predicted: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the actions over real (unpadded) steps."""
    mask = batch["attention_mask"].to(predicted.dtype)
    per_step = ((predicted - batch["actions"]) ** 2).mean(-1)
    return (per_step * mask).sum() / mask.sum().clamp_min(1.0)


def real_step_tokens(x: torch.Tensor, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """EVA's token selector for the DT: its layers see (B, 3T, d), three tokens (return, state,
    action) per step, while the step mask is (B, T); keep the tokens of real steps, drop the left
    padding."""
    keep = batch["attention_mask"].to(x.device).bool().repeat_interleave(3, dim=1)
    if x.shape[:2] != keep.shape:
        raise ValueError(
            f"{name}: input of shape {tuple(x.shape)} is not (batch, 3 x steps = {keep.shape[1]}, "
            "d)"
        )
    return x[keep]


# --------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (the paper's: AdamW, lr 1e-4 with 4000 warm-up steps then cosine to 1e-6,
    grad clip 0.25, weight decay 0.01, batch 128)."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 300
    weight_decay: float = 0.01
    grad_clip: float = 0.25


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to ``lr``, then cosine to ``min_lr`` at the last step (as a factor of lr)."""
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps - 1, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _train(
    model: nn.Module,
    trajectories: Sequence[Trajectory],
    config: TrainConfig,
    context: int,
    seed: int,
) -> dict[str, Any]:
    """Train ``model``'s parameters that require grad; windows and dropout seeded by ``seed``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config))
    windows = torch.Generator().manual_seed(seed)
    losses, begun = [], time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[]):  # dropout draws: seeded, global RNG left as it was
        torch.manual_seed(seed)
        for _ in range(config.steps):
            batch = sample_windows(trajectories, config.batch_size, context, windows)
            loss = action_loss(model(**batch), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 6))
    model.eval()
    return {
        "losses": losses,
        "train_seconds": round(time.perf_counter() - begun, 2),
        "steps": config.steps,
    }


def pretrain(
    trajectories: Sequence[Trajectory], policy: PolicyConfig, train: TrainConfig, seed: int
) -> tuple[DecisionPolicy, dict[str, Any]]:
    """(policy in eval mode, info): every weight trained on the multi-task demonstrations."""
    model = build_policy(policy, trajectories, seed)
    return model, _train(model, trajectories, train, policy.context, seed)


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA / EVA adapters on every GPT-2 block's four matrices (``TARGETS``)."""

    rank: int = 8
    lora_alpha: float = 8.0
    rho: float = 2.0
    tau: float = 0.99
    eva_batch_size: int = 64
    eva_max_batches: int = 64


def eva_batches(
    trajectories: Sequence[Trajectory], adapters: AdapterConfig, context: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """EVA's PCA windows: fine-tuning windows drawn like training ones (another seeded stream)."""
    g = torch.Generator().manual_seed(seed + 7919)
    return [
        sample_windows(trajectories, adapters.eva_batch_size, context, g)
        for _ in range(adapters.eva_max_batches)
    ]


def finetune(
    model: DecisionPolicy,
    init: Init,
    trajectories: Sequence[Trajectory],
    adapters: AdapterConfig,
    train: TrainConfig,
    seed: int,
) -> tuple[Any, dict[str, Any]]:
    """(PEFT model in eval mode, info): LoRA on a copy of ``model``, trained on ``trajectories``.

    ``init="lora"``: PEFT's default (A random from ``seed``, B = 0). ``init="eva"``: A from the PCA
    of each layer's inputs on fine-tuning windows (real steps' tokens only), ranks redistributed
    with ``rho``; B = 0. Only the adapters train; both inits share the training windows and dropout
    draws.
    """
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(model).eval()
    for p in base.parameters():
        p.requires_grad = False
    info: dict[str, Any] = {"init": init}
    if init == "eva":
        cfg = EvaConfig(
            rank=adapters.rank,
            rho=adapters.rho,
            tau=adapters.tau,
            target_modules=TARGETS,
            max_batches=adapters.eva_max_batches,
            seed=seed,
        )
        begun = time.perf_counter()
        # a stop at max_batches before tau is reported in info instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            state = compute_eva_state(
                base,
                eva_batches(trajectories, adapters, model.config.context, seed),
                cfg,
                select_tokens=real_step_tokens,
                progress=False,
            )
        info.update(
            init_seconds=round(time.perf_counter() - begun, 2),
            eva_batches=state.n_batches,
            stop_reason=state.stop_reason,
            ranks=dict(state.ranks),
        )
        peft_model = apply_eva_state(
            base, state, lora_alpha=adapters.lora_alpha, fan_in_fan_out=True
        )
    elif init == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(
                base,
                LoraConfig(
                    r=adapters.rank,
                    lora_alpha=adapters.lora_alpha,
                    target_modules=TARGETS,
                    fan_in_fan_out=True,
                ),
            )
    else:
        raise ValueError(f"init must be 'lora' or 'eva', got {init!r}")
    for name, p in peft_model.named_parameters():
        p.requires_grad = "lora_" in name
    info["trainable"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    info.update(_train(peft_model, trajectories, train, model.config.context, seed))
    return peft_model, info


# --------------------------------------------------------------------------------------------------
# Evaluation


def _dt_actor(model: nn.Module, context: int, target: float) -> Callable[..., np.ndarray]:
    """The policy as an actor for one episode: it keeps the episode's states and actions, and feeds
    the last ``context`` steps (left-padded like a training window) with returns-to-go
    ``target - collected``."""
    states: list[np.ndarray] = []
    actions: list[torch.Tensor] = []

    def act(obs: np.ndarray, step: int, rewards: list[float]) -> np.ndarray:
        states.append(np.asarray(obs, dtype=np.float32))
        start = max(0, step - context + 1)
        real = step - start + 1
        batch = {
            "states": torch.zeros(1, context, STATE_DIM),
            "actions": torch.zeros(1, context, ACT_DIM),
            "returns_to_go": torch.zeros(1, context, 1),
            "timesteps": torch.zeros(1, context, dtype=torch.long),
            "attention_mask": torch.zeros(1, context, dtype=torch.long),
        }
        batch["states"][0, -real:] = torch.from_numpy(np.stack(states[start:]))
        # the current step's action is unknown: it stays 0 (training never lets it be seen)
        if real > 1:
            batch["actions"][0, -real:-1] = torch.stack(actions[start:])
        collected = np.cumsum([0.0, *rewards])  # reward collected before each step so far
        batch["returns_to_go"][0, -real:, 0] = torch.tensor(
            target - collected[start:], dtype=torch.float32
        )
        batch["timesteps"][0, -real:] = torch.arange(start, step + 1)
        batch["attention_mask"][0, -real:] = 1
        with torch.no_grad():
            action = model(**batch)[0, -1].clamp(-1.0, 1.0)
        actions.append(action)
        return action.numpy()

    return act


def evaluate_success(
    model: nn.Module, task: str, episodes: int, seed: int, target: float, max_steps: int = 200
) -> dict[str, Any]:
    """Roll the policy out for ``episodes`` episodes of ``task`` (goals of ``MT1(task, seed)``).

    Conditioned on the return ``target`` (minus the reward collected so far), context of the
    policy's ``K`` last steps. Success rate = fraction of episodes with ``info["success"]`` at any
    step; an episode stops at its first success or after ``max_steps``. Deterministic: no sampling,
    eval mode.
    """
    _check_max_steps(max_steps)
    policy = model.get_base_model() if hasattr(model, "get_base_model") else model
    context = policy.config.context
    env, goals = task_env(task, seed)
    results = []
    model.eval()
    for episode in range(episodes):
        act = _dt_actor(model, context, target)
        _, _, rewards, successes, reason = _rollout(
            env, goals[episode % len(goals)], act, max_steps, hold_steps=0
        )
        results.append(
            {
                "success": any(successes),
                "steps": len(successes),
                "return": round(sum(rewards), 3),
                "stop_reason": reason,
            }
        )
    env.close()
    return {
        "task": task,
        "success_rate": sum(r["success"] for r in results) / episodes,
        "episodes": results,
    }
