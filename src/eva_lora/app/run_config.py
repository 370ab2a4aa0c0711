"""Configuration of the recipes (init, train, eval, compare): a frozen dataclass, YAML, overrides.

A YAML file mirrors the dataclass: top-level keys are ``RunConfig`` fields, the ``eva:`` mapping
holds ``EvaConfig`` fields. ``key=value`` overrides use the same names (``eva.rho=2``); values
are parsed as YAML scalars. Precedence: defaults < preset < YAML file < overrides. Presets are the
YAML files in ``eva_lora/app/configs/`` (each starts with the command that runs it).

Every field is checked (type, range, allowed values) when the config is built, before any model or
data is loaded; a bad value is one line naming the setting and what it accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EvaConfig
from ..fields import check_fields, coerce_numbers, unknown_keys

CONFIG_DIR = Path(__file__).parent / "configs"
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


def _task_names() -> tuple[str, ...]:
    from .tasks import TASKS

    return tuple(TASKS)


def _eval_task_objects(name: str) -> list:
    from .tasks import eval_tasks

    return eval_tasks(name)


def _init_names() -> tuple[str, ...]:
    from .initializers import INIT_METHODS

    return tuple(INIT_METHODS)


@dataclass(frozen=True)
class RunConfig:
    """Everything one fine-tuning / evaluation run needs. ``model="minilm"`` is the bundled encoder.

    ``rank`` is the one LoRA rank of a run: every init method uses it, and ``eva.rank`` follows it.
    """

    model: str = "minilm"
    task: str = "sst2"
    init: str = "eva"
    # folder laid out like ../shared/data (glue/, gsm8k/, commonsense/ ...)
    data_dir: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    output_dir: str = "out/run"
    rank: int = field(default=8, metadata={"min": 1})
    lora_alpha: float = field(default=1.0, metadata={"above": 0.0})
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    learning_rate: float = field(default=5e-4, metadata={"above": 0.0})
    batch_size: int = field(default=16, metadata={"min": 1})
    grad_accum: int = field(default=1, metadata={"min": 1})
    epochs: float = field(default=1.0, metadata={"above": 0.0})
    # > 0 overrides epochs; -1 = use epochs
    max_steps: int = field(default=-1, metadata={"min": -1})
    warmup_ratio: float = field(default=0.03, metadata={"min": 0.0, "max": 0.99})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    scheduler: str = field(default="linear", metadata={"choices": SCHEDULERS})
    max_length: int = field(default=512, metadata={"min": 1})
    drop_long: bool = False  # drop over-long examples instead of truncating them
    # a fixed random subset of N rows
    train_limit: int | None = field(default=None, metadata={"min": 1})
    eval_limit: int | None = field(default=None, metadata={"min": 1})  # the same rows for every run
    eval_batch_size: int = field(default=32, metadata={"min": 1})
    max_new_tokens: int = field(default=256, metadata={"min": 1})
    # code tasks: > 1 samples per problem -> pass@k too
    samples: int = field(default=1, metadata={"min": 1})
    # sampling temperature when samples > 1
    temperature: float = field(default=0.8, metadata={"above": 0.0})
    # batch size of the EVA / CorDA / LoRA-GA pass
    svd_batch_size: int = field(default=16, metadata={"min": 1})
    # > 0: that fraction of the training rows is held out (fixed seed);
    # training uses the rest and evaluation scores the held-out rows
    # instead of the test set (how `eva compare --lr` chooses a rate)
    validation: float = field(default=0.0, metadata={"min": 0.0, "max": 0.5})
    # batches CorDA and LoRA-GA use
    calibration_batches: int = field(default=8, metadata={"min": 1})
    eva_state: str | None = None  # a precomputed state directory (from `eva init`)
    seed: int = field(default=0, metadata={"min": 0})
    logging_steps: int = field(default=5, metadata={"min": 1})
    save_steps: int = field(default=0, metadata={"min": 0})  # 0: checkpoint once per epoch
    # continue from the latest checkpoint in output_dir (its run.json must match)
    resume: bool = False
    # start afresh in an output_dir that holds another run (its files are replaced)
    overwrite: bool = False
    force: bool = False  # accept a mismatching EVA state / adapter / resumed run on purpose
    bf16: bool = False
    # QLoRA's 4-bit base
    load_in_4bit: str | None = field(default=None, metadata={"choices": ("nf4", "fp4")})
    # eva init: one decoder block at a time (a model larger than the device)
    sequential: bool = False
    offload: str = "cpu"  # sequential: where hidden states wait between blocks ("cpu" or a folder)
    # sequential: the ModuleList of decoder blocks, when it cannot be found
    blocks: str | None = None
    progress: bool = True  # progress bars (EVA and training) and a log line every logging_steps
    strict: bool = False  # EVA raises instead of warning when it stops before converging
    eva: EvaConfig = field(default_factory=EvaConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        for name, choices in (("task", _task_names()), ("init", _init_names())):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}"
                )
        if self.samples > 1 and not any(
            t.main_metric.startswith("pass@") for t in _eval_task_objects(self.task)
        ):
            raise ValueError(
                f"samples > 1 (pass@k) applies to the code tasks (humaneval, mbpp, code), not to "
                f"{self.task!r}, which is scored on greedy answers"
            )
        if self.max_steps == 0:
            raise ValueError("max_steps must be -1 (train for `epochs`) or an integer >= 1, got 0")
        if self.eva.rank != self.rank:
            if self.eva.rank != EvaConfig.rank:
                raise ValueError(
                    f"eva.rank ({self.eva.rank}) differs from rank ({self.rank}): "
                    "a run has one rank, set it at the top level (rank=...)"
                )
            object.__setattr__(self, "eva", dataclasses.replace(self.eva, rank=self.rank))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["eva"] = self.eva.to_dict()
        return out


def presets() -> dict[str, Path]:
    """name -> YAML file of every bundled recipe config (``eva_lora/app/configs/*.yaml``)."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def preset_summary(path: Path) -> str:
    """The first comment lines of a preset file after its command line: what it is for."""
    lines = [
        line[1:].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    ]
    return " ".join(
        line for line in lines if not line.startswith("eva ") and not line.startswith("$")
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["eva.rho=2", "rank=4"] -> {"eva": {"rho": 2}, "rank": 4} (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw  # not a YAML scalar: keep the text, the field check says what is wanted
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    return out


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping, or one line saying what is wrong with the file."""
    import yaml

    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config file must be a mapping of RunConfig fields")
    return loaded


def build_run_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults < preset < YAML < overrides, every field checked; unknown keys name themselves."""
    merged: dict[str, Any] = {}
    if preset is not None:
        files = presets()
        if preset not in files:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(files)}")
        _deep_update(merged, read_yaml(files[preset], "preset"))
    if file is not None:
        _deep_update(merged, read_yaml(Path(file), "config file"))
    _deep_update(merged, overrides or {})
    eva = merged.pop("eva", {}) or {}
    if not isinstance(eva, dict):
        raise ValueError(f"eva must be a mapping of EvaConfig fields, got {eva!r}")
    unknown_keys(merged, RunConfig, "run")
    unknown_keys(eva, EvaConfig, "eva")
    if "rank" in eva:
        raise ValueError(
            "set rank at the top level (rank=...), not in the eva section: a run has one rank, "
            "used by every init method and by EVA"
        )
    run = coerce_numbers(merged, RunConfig)
    rank = run.get("rank", RunConfig.rank)
    # else RunConfig says so
    valid_rank = isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1
    try:
        eva_config = EvaConfig(
            **coerce_numbers(eva, EvaConfig), **({"rank": rank} if valid_rank else {})
        )
    except ValueError as err:
        raise ValueError(f"eva.{err}") from None
    return RunConfig(**run, eva=eva_config)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
