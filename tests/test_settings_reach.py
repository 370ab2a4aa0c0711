"""Every setting reaches the code that uses it, on every command (issue 26, item 2).

Each command runs once on a tiny model with configs whose attribute reads are recorded; a read
counts when it comes from the library's own code, outside construction, validation and serialisation
(``__post_init__``, the field checker, ``to_dict``: those read every field whatever the command
does). One test per (command, setting) is generated from the settings' tables (``RunConfig`` and
``EvaConfig`` fields): a setting a command should use and never reads fails its test. ``NOT_READ``
lists, with the reason, what a command does not use in this run; an exemption that is read after all
fails too, so the table cannot drift into a list of everything.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

import helpers
from eva_lora import EvaConfig
from eva_lora.app import run_config
from eva_lora.app.cli import main
from eva_lora.app.run_config import RunConfig

SRC = str(Path(run_config.__file__).parents[1])
NOT_COUNTED = {
    "__post_init__",
    "to_dict",
    "statistics_dict",
    "shaping_settings",
    "same_settings",
    "check_fields",
    "conforms",
    "__eq__",
    "__repr__",
    "__hash__",
}
RUN_FIELDS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "eva"]
EVA_FIELDS = [f.name for f in dataclasses.fields(EvaConfig)]

# What a command does not use in the runs below, and why. Everything else must be read.
TRAIN_ONLY = {
    "init": "the init method",
    "lora_alpha": "LoRA training",
    "lora_dropout": "LoRA training",
    "learning_rate": "training",
    "batch_size": "training",
    "grad_accum": "training",
    "epochs": "training",
    "max_steps": "training",
    "warmup_ratio": "training",
    "weight_decay": "training",
    "scheduler": "training",
    "logging_steps": "training",
    "save_steps": "training",
    "resume": "train's --resume (init has its own flag)",
}
EVAL_ONLY = {
    "eval_file": "evaluation data",
    "eval_limit": "evaluation",
    "eval_batch_size": "evaluation",
    "max_new_tokens": "generation at evaluation",
    "samples": "pass@k at evaluation",
    "temperature": "sampling at evaluation (samples > 1)",
}
READY_ADAPTER = ("lora_alpha", "lora_dropout")  # init writes a ready adapter with them
RANK = "reaches the code as eva.rank (RunConfig copies it there when it is built)"
# tests/test_engine.py::test_a_converged_sketch_explores_once_per_window_... shows its effect
SKETCH_WINDOW = "read once a sketch group has converged; the tiny model's groups are all exact"
NOT_READ = {
    "init": {
        **{k: v for k, v in TRAIN_ONLY.items() if k not in READY_ADAPTER},
        **EVAL_ONLY,
        "eva_state": "init computes the state",
        "rank": RANK,
        "output_dir": "--output is given",
        "calibration_batches": "CorDA / LoRA-GA only",
        "force": "nothing is loaded from an earlier run",
        "offload": "sequential only",
        "blocks": "sequential only",
        "validation": "init takes every training row it is given (train and compare hold rows out)",
        "eva.sketch_window": SKETCH_WINDOW,
    },
    "train": {
        "rank": RANK,
        "offload": "sequential only (refused by train)",
        "blocks": "sequential only (refused by train)",
        "eva.sketch_window": SKETCH_WINDOW,
    },
    "eval": {
        **TRAIN_ONLY,
        "eva_state": "no init",
        "calibration_batches": "no init",
        "svd_batch_size": "no init",
        "train_file": "no training data",
        "train_limit": "no training data",
        "drop_long": "evaluation never drops an item",
        "sequential": "init only",
        "offload": "init only",
        "blocks": "init only",
        "strict": "no EVA",
        "overwrite": "eval writes one file, --output",
        "rank": "no LoRA is built",
        "output_dir": "--output is given",
        "force": "no --adapter in this run (load_with_adapter reads it)",
    },
}
EVA_EXEMPT = {"init": set(), "train": set(), "eval": set(EVA_FIELDS)}


def tracked(cls: type, prefix: str, reads: set[str]) -> type:
    names = {f.name for f in dataclasses.fields(cls)}

    class Tracked(cls):
        def __getattribute__(self, name: str):
            if name in names:
                frame = sys._getframe(1)
                # a comprehension
                while frame.f_code.co_name.startswith("<") and frame.f_back is not None:
                    frame = frame.f_back
                code = frame.f_code
                if (
                    code.co_filename.startswith(SRC)
                    and code.co_name not in NOT_COUNTED
                    and not code.co_filename.endswith("fields.py")
                ):
                    reads.add(prefix + name)
            return object.__getattribute__(self, name)

    Tracked.__name__ = Tracked.__qualname__ = cls.__name__
    return Tracked


COMMANDS = {
    "init": ["init", "--output", "{tmp}/state"],
    "train": ["train", "--output-dir", "{tmp}/run", "--init", "eva"],
    "eval": ["eval", "--output", "{tmp}/eval.json"],
}
QUICK = [
    "train_limit=16",
    "eval_limit=2",
    "max_steps=2",
    "max_length=96",
    "batch_size=4",
    "svd_batch_size=4",
    "logging_steps=1",
    "max_new_tokens=4",
    "eval_batch_size=2",
    "progress=false",
    "rank=4",
    "eva.max_batches=4",
]


@pytest.fixture(scope="module")
def reads(tiny_llama_dir, tmp_path_factory) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    real = run_config.build_run_config
    for command, argv in COMMANDS.items():
        seen: set[str] = set()
        run_class, eva_class = tracked(RunConfig, "", seen), tracked(EvaConfig, "eva.", seen)

        def build(*args, _seen=seen, _run=run_class, _eva=eva_class, **kwargs):
            cfg = real(*args, **kwargs)
            eva = _eva(**{f: getattr(cfg.eva, f) for f in EVA_FIELDS})
            made = _run(**{f: getattr(cfg, f) for f in RUN_FIELDS}, eva=eva)
            _seen.clear()  # construction and checks read everything
            return made

        run_config.build_run_config = build
        try:
            tmp = tmp_path_factory.mktemp(command)
            code = main(
                [a.format(tmp=tmp) for a in argv]
                + [
                    "--model",
                    str(tiny_llama_dir),
                    "--task",
                    "gsm8k",
                    "--data-dir",
                    str(helpers.ROOT / "tests/assets/data"),
                    *QUICK,
                ]
            )
        finally:
            run_config.build_run_config = real
        assert code == 0, f"eva {command} failed"
        out[command] = set(seen)
    return out


CASES = [(c, f) for c in COMMANDS for f in RUN_FIELDS + [f"eva.{n}" for n in EVA_FIELDS]]


@pytest.mark.slow
@pytest.mark.parametrize("command,setting", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_every_setting_reaches_every_command(reads, command, setting):
    exempt = setting in NOT_READ[command] or (
        setting.startswith("eva.") and setting[4:] in EVA_EXEMPT[command]
    )
    if exempt:
        assert setting not in reads[command], (
            f"{setting} is read by eva {command}: drop its exemption"
        )
    else:
        assert setting in reads[command], f"eva {command} never reads {setting}"
