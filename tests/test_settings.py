"""Every setting of RunConfig and EvaConfig is checked before any work starts (key=value, YAML,
presets alike): a bad value is one line naming the setting and what it accepts, exit code 2."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest

from eva_lora import EvaConfig
from eva_lora.app.cli import main
from eva_lora.app.run_config import RunConfig, build_run_config


def bad_value(hint: Any, meta: dict) -> Any:
    """A value of the wrong type or out of range for a field of this type."""
    members = (
        get_args(hint) if get_origin(hint) in (Union, __import__("types").UnionType) else (hint,)
    )
    if bool in members:
        return "maybe"
    if int in members or float in members:
        if "min" in meta:
            return meta["min"] - 1
        if "above" in meta:
            return meta["above"]
        return "abc"
    if any(get_origin(m) is Literal for m in members) or "choices" in meta:
        return "nope"
    if str in members:
        return 3
    if dataclasses.is_dataclass(hint):
        return "text"
    raise AssertionError(f"no bad value for {hint}")


def fields_of(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        if field.name == "eva":
            continue
        value = (
            "nope"
            if field.name in ("task", "init")
            else bad_value(hints[field.name], dict(field.metadata))
        )
        out.append((prefix + field.name, value))
    return out


CASES = fields_of(RunConfig) + fields_of(EvaConfig, "eva.")


@pytest.mark.parametrize("key,value", CASES, ids=[k for k, _ in CASES])
def test_a_bad_value_for_every_setting_is_one_line_and_exit_2(tmp_path, capsys, key, value):
    if key == "eva.rank":  # the run's rank has one owner: the top-level `rank`
        value = 4
    out = tmp_path / "out"
    code = main(
        ["train", f"{key}={value}", "--output-dir", str(out)]
        if key != "output_dir"
        else ["train", f"{key}={value}"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("eva train: error: ")
    assert (key in err) or (key == "eva.rank" and "set rank at the top level" in err), err
    assert not out.exists()


def test_every_field_has_a_case():
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"eva"}
    eva = {f.name for f in dataclasses.fields(EvaConfig)}
    assert {k for k, _ in CASES} == names | {f"eva.{n}" for n in eva}


def test_the_same_check_applies_to_yaml_files_and_presets(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("bf16: maybe\n")
    with pytest.raises(ValueError, match="bf16 must be true or false, got 'maybe'"):
        build_run_config("glue", file)
    file.write_text("eva:\n  tau: 2\n")
    with pytest.raises(ValueError, match=r"eva.tau must be a number >= 0.0 and <= 1.0, got 2"):
        build_run_config(None, file)
    for preset in ("math", "commonsense", "glue"):  # every bundled preset passes the same checks
        assert build_run_config(preset).rank >= 1


def test_rank_has_one_owner():
    cfg = build_run_config(None, None, {"rank": 6})
    assert cfg.rank == cfg.eva.rank == 6
    with pytest.raises(ValueError, match=r"eva.rank \(8\) differs from rank \(4\)"):
        RunConfig(rank=4, eva=EvaConfig(rank=8))
    assert RunConfig(rank=4).eva.rank == 4
