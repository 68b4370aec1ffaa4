"""Every numeric setting of every `pocketllm` subcommand is checked (finite, in its declared
range) as a flag, as a YAML value and in code, before anything loads.

The flags are walked from the dataclasses the parser is generated from (`cli.COMMANDS` and every
registered method's `Config`): a new setting is tested by being declared, and one declared
without a range fails `test_every_numeric_setting_declares_its_range`.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import yaml

from pocketllm import cli
from pocketllm import config as C
from pocketllm.methods import setting_classes


def _classes(command: str) -> list[type]:
    cls, _ = cli.COMMANDS[command]
    return [cls, *(setting_classes() if command in cli.WITH_METHOD_SETTINGS else ())]


def _numeric_flags() -> list[tuple[str, dataclasses.Field, type]]:
    """(command, field, int or float) for each numeric flag, as `add_args` makes them (a name
    in several classes: the first one's)."""
    out = []
    for command in cli.COMMANDS:
        seen: set[str] = set()
        for cls in _classes(command):
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                kind = C.numeric_kind(hints[f.name])
                if kind and f.name not in seen:
                    out.append((command, f, kind))
                seen.add(f.name)
    return out


def _declarations() -> list[tuple[type, dataclasses.Field, type]]:
    """(class, field, int or float) for every numeric field of every settings class."""
    classes = dict.fromkeys(c for command in cli.COMMANDS for c in _classes(command))
    return [(cls, f, C.numeric_kind(typing.get_type_hints(cls)[f.name]))
            for cls in classes for f in dataclasses.fields(cls)
            if C.numeric_kind(typing.get_type_hints(cls)[f.name])]


FLAGS = _numeric_flags()
IDS = [f"{command} {C.flag(f.name)}" for command, f, _ in FLAGS]


def _out_of_range(f: dataclasses.Field, kind: type) -> str:
    """A value just outside the field's declared range (or choices)."""
    b = f.metadata.get("bounds")
    if b is None:  # a choice list only (--act-bits)
        choices = f.metadata["choices"]
        return str(max(choices() if callable(choices) else choices) + 1)
    step = 1 if kind is int else 0.5
    for value in ([b.ge - step] if b.ge is not None else []) + \
                 ([b.gt] if b.gt is not None else []) + \
                 ([b.le + step] if b.le is not None else []) + \
                 ([b.lt] if b.lt is not None else []):
        if value not in b.also:
            return str(kind(value))
    raise AssertionError(f"{C.flag(f.name)}: no value outside its range to try")


@pytest.fixture
def nothing_runs(monkeypatch):
    """Every command's body fails the test if it is reached: a refusal happens before any
    data or model is loaded (they all load inside the command)."""
    for command in cli.COMMANDS:
        monkeypatch.setattr(cli, f"cmd_{command}", _reached(command))


def _reached(command):
    def run(*args):
        raise AssertionError(f"{command} ran: a bad setting got past the check")
    return run


def _argv(command: str, *rest: str) -> list[str]:
    # a command with a positional action (bench accuracy, federate simulate): its first
    return [command, *cli.ACTIONS.get(command, ())[:1], *rest]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_the_walk_finds_every_subcommands_numbers():
    commands = {command for command, _, _ in FLAGS}
    assert commands == set(cli.COMMANDS)  # each has a number (fuse and replay: --seed)
    names = {(command, f.name) for command, f, _ in FLAGS}
    for expected in [("train", "learning_rate"), ("train", "iters"), ("train", "batch_size"),
                     ("train", "eps"), ("train", "zo_beta1"), ("train", "weight_decay"),
                     ("train", "queries"), ("train", "side_width"), ("serve", "port"),
                     ("bench", "seeds"), ("memory", "queries"), ("generate", "temp"),
                     ("eval", "max_batches")]:
        assert expected in names, expected


@pytest.mark.parametrize("cls,f,kind", _declarations(),
                         ids=[f"{c.__name__}.{f.name}" for c, f, _ in _declarations()])
def test_every_numeric_setting_declares_its_range(cls, f, kind):
    bounds, choices = f.metadata.get("bounds"), f.metadata.get("choices")
    assert bounds is not None or choices, (
        f"{cls.__name__}.{f.name}: declare its range, e.g. opt(..., ge=0) (config.Bounds)")
    # the default itself is in range (a sentinel such as -1 is listed in `also`)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for value in default if isinstance(default, list) else [default]:
        assert C.to_number(f, kind, value) == value


@pytest.mark.parametrize("command,f,kind", FLAGS, ids=IDS)
def test_a_bad_number_is_refused_as_the_flags_are_parsed(command, f, kind, nothing_runs,
                                                          capsys):
    flag = C.flag(f.name)
    for value in ("nan", "inf", "-inf", _out_of_range(f, kind)):
        with pytest.raises(SystemExit) as e:
            cli.main(_argv(command, f"{flag}={value}"))
        assert e.value.code == 2, (flag, value)
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"pocketllm {command}: error: argument {flag}: "), line
        assert value in line and line.endswith(f"(see pocketllm {command} --help)"), line


@pytest.mark.parametrize("command,f,kind", FLAGS, ids=IDS)
def test_a_bad_number_in_a_yaml_config_is_refused(command, f, kind, nothing_runs, capsys,
                                                   tmp_path):
    flag = C.flag(f.name)
    cfg = tmp_path / "settings.yaml"
    for value in (math.nan, math.inf, -math.inf, _out_of_range(f, kind)):
        key = f.name.replace("_", "-")
        # numbers as YAML writes them (.nan, .inf), the out-of-range one as a number too
        cfg.write_text(yaml.safe_dump({key: value if isinstance(value, float)
                                       else yaml.safe_load(value)}))
        assert cli.main(_argv(command, "-c", str(cfg))) == 2, (flag, value)
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"error: {cfg}: setting '{key}' ({flag}) must be "), line


def test_flag_values_in_range_pass_and_keep_their_type():
    p = cli.build_parser()
    ns = p.parse_args(["train", "--learning-rate", "1e-3", "--iters", "5", "--val-batches", "-1",
                       "--lora-dropout", "0", "--zo-beta1", "0.5"])
    assert (ns.learning_rate, ns.iters, ns.val_batches, ns.lora_dropout) == (1e-3, 5, -1, 0.0)
    assert type(ns.iters) is int and type(ns.learning_rate) is float
    ns = p.parse_args(["bench", "accuracy", "--seeds", "1", "2"])
    assert ns.seeds == [1, 2]


@pytest.mark.parametrize("bounds,kind,text", [
    (C.Bounds(gt=0), float, "a finite number > 0"),
    (C.Bounds(ge=0, lt=1), float, "a finite number in [0, 1)"),
    (C.Bounds(ge=0, le=65535), int, "an integer in [0, 65535]"),
    (C.Bounds(ge=1, also=(-1,)), int, "an integer >= 1 (or -1)"),
    (C.Bounds(le=2.5), float, "a finite number <= 2.5"),
    (C.Bounds(), float, "a finite number"),
])
def test_bounds_say_what_they_take(bounds, kind, text):
    assert bounds.describe(kind) == text


def test_to_number_refuses_what_is_not_a_number_of_the_kind():
    f = dataclasses.fields(C.TrainArgs)
    iters = next(x for x in f if x.name == "iters")
    lr = next(x for x in f if x.name == "learning_rate")
    assert C.to_number(iters, int, "3") == 3 and C.to_number(lr, float, 1) == 1.0
    assert C.to_number(lr, float, "1e-3") == 1e-3  # YAML reads 1e-3 as a string
    for bad in (True, 2.5, "2.5", "1e3", None, "", [1]):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            C.to_number(iters, int, bad)
    for bad in ("nan", "1e400", 10 ** 400, -1e-9, False, "fast"):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            C.to_number(lr, float, bad)


def test_settings_built_in_code_are_checked_before_the_model_loads(monkeypatch, tmp_path):
    from pocketllm import train as T
    monkeypatch.setattr(T, "load_model", _reached("load_model"))
    monkeypatch.setattr(T, "load_run_data", _reached("load_run_data"))
    with pytest.raises(C.SettingError, match=r"--iters must be an integer >= 1, got -1"):
        T.train(C.TrainArgs(model="tiny-llama", iters=-1, adapter_path=str(tmp_path)))
    with pytest.raises(C.SettingError, match=r"--eps must be a finite number >= 0, got nan"):
        T.train(C.TrainArgs(model="tiny-llama", adapter_path=str(tmp_path)), {"eps": math.nan})
    assert not any(tmp_path.iterdir())  # not even config.yaml


def test_yaml_choices_are_checked_as_the_flags_are(tmp_path, capsys, nothing_runs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("act-bits: 5\n")
    assert cli.main(["train", "-c", str(cfg)]) == 2
    assert "(--act-bits) must be one of 16, 8, 4, got 5" in capsys.readouterr().err
