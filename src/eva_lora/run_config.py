"""Configuration of the recipes (init, train, eval, compare): frozen dataclasses, YAML and overrides.

A YAML file mirrors the dataclass: top-level keys are ``RunConfig`` fields, the ``eva:`` mapping
holds ``EvaConfig`` fields. ``key=value`` overrides use the same names (``eva.rho=2``); values
are parsed as YAML scalars. Precedence: defaults < preset < YAML file < overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import EvaConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything one fine-tuning / evaluation run needs. ``model="minilm"`` is the bundled encoder."""

    model: str = "minilm"
    task: str = "sst2"
    init: str = "eva"
    data_dir: str | None = None  # folder laid out like ../shared/data (glue/, gsm8k/, commonsense/ ...)
    train_file: str | None = None
    eval_file: str | None = None
    output_dir: str = "out/run"
    rank: int = 8
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    learning_rate: float = 5e-4
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    scheduler: str = "linear"
    max_length: int = 512
    drop_long: bool = False  # drop over-long examples instead of truncating them
    train_limit: int | None = None  # N training examples, a fixed random subset (quick runs)
    eval_limit: int | None = None  # N evaluation examples, a fixed random subset (same rows for every run)
    eval_batch_size: int = 32
    max_new_tokens: int = 256
    svd_batch_size: int = 16  # batch size of the EVA / CorDA / LoRA-GA initialisation pass
    calibration_batches: int = 8  # batches CorDA and LoRA-GA use (EVA stops on convergence instead)
    eva_state: str | None = None  # a precomputed state directory (from `eva init`)
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 0  # 0: checkpoint once per epoch
    resume: bool = False  # continue from the latest checkpoint in output_dir
    bf16: bool = False
    eva: EvaConfig = field(default_factory=lambda: EvaConfig(progress=True))

    def __post_init__(self) -> None:
        positive = {"rank": self.rank, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_length": self.max_length, "svd_batch_size": self.svd_batch_size,
                    "eval_batch_size": self.eval_batch_size, "logging_steps": self.logging_steps,
                    "calibration_batches": self.calibration_batches}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.learning_rate <= 0 or not 0 <= self.warmup_ratio < 1 or self.epochs <= 0:
            raise ValueError("learning_rate and epochs must be > 0 and warmup_ratio in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["eva"] = self.eva.to_dict()
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # ../shared/PAPER.md, Table 9: MetaMathQA-style math fine-tuning.
    "math": dict(task="gsm8k", rank=16, lora_alpha=1.0, learning_rate=5e-4, batch_size=4, grad_accum=2,
                 epochs=1.0, warmup_ratio=0.03, scheduler="linear", weight_decay=0.0, lora_dropout=0.0,
                 max_length=512, svd_batch_size=16),
    # Table 9: joint common-sense set, over-long examples dropped.
    "commonsense": dict(task="commonsense", rank=16, lora_alpha=1.0, learning_rate=5e-4, batch_size=4,
                        grad_accum=2, epochs=1.0, warmup_ratio=0.03, scheduler="linear", max_length=1024,
                        drop_long=True, svd_batch_size=16),
    # Table 13: GLUE with linear schedule, warmup 0.06, max length 512; rank 8 of the {2,4,6,8} grid.
    "glue": dict(rank=8, lora_alpha=1.0, learning_rate=4e-4, batch_size=32, warmup_ratio=0.06,
                 scheduler="linear", max_length=512, svd_batch_size=16),
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["eva.rho=2", "rank=4"] -> {"eva": {"rho": 2}, "rank": 4} (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        value = yaml.safe_load(raw) if raw else None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def build_run_config(preset: str | None = None, file: str | Path | None = None,
                     overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < preset < YAML file < overrides, validated; unknown keys are an error naming them."""
    import yaml

    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a mapping of RunConfig fields")
        _deep_update(merged, loaded)
    _deep_update(merged, overrides or {})
    eva = merged.pop("eva", {}) or {}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(known)}")
    eva_known = {f.name for f in dataclasses.fields(EvaConfig)}
    bad_eva = sorted(set(eva) - eva_known)
    if bad_eva:
        raise ValueError(f"unknown eva setting(s) {bad_eva}; valid: {sorted(eva_known)}")
    rank = merged.get("rank", RunConfig.rank)
    eva_config = EvaConfig.from_dict({**EvaConfig(progress=True).to_dict(), **eva, "rank": rank})
    return RunConfig(**merged, eva=eva_config)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
