"""Flags generated from a config's fields (perfusion.config_flags), on toy configs: names, help, parsing by the
field's type, overrides, errors naming the flag, and the parser that adds them only when it is used."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from perfusion.config_flags import (
    ConfigFlagsParser,
    add_config_flags,
    add_config_flags_when_used,
    config_flags,
    config_from_flags,
    flag_arguments,
    given_values,
)
from perfusion.errors import ConfigError
from perfusion.frozen_config import FrozenConfig
from perfusion.sampler_config import SamplerConfig
from perfusion.settings import Settings


class ToyConfig(FrozenConfig):
    """A config of every kind of field a flag parses."""

    group_size: int = Field(default=4, ge=2, description="candidates per group, 100% of them shown")
    learning_rate: float | None = Field(default=None, description="None: the trainer's")
    folder: Path = Field(default=Path("assets/base"), description="the base model folder")
    label: str = Field(default="clicks", description="what makes a positive")
    shuffled: bool = Field(default=True, description="shuffle the groups")
    widths: tuple[int, ...] = Field(default=(8, 16), description="channel widths")


class Window(Settings):
    window_s: float = Field(default=10.0, gt=0, description="window length in seconds")


class Sectioned(Settings):
    name: str = Field(default="a", description="a name")
    window: Window = Field(default_factory=Window, description="the window")


def _parser(config_cls: type[BaseModel] = ToyConfig, *exclude: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    parser.add_argument("--out", type=Path, default=None)
    add_config_flags(parser, config_cls, exclude)
    return parser


def test_one_flag_per_field_named_after_it_with_its_description_and_default() -> None:
    parser = _parser()
    assert [flag.flag for flag in config_flags(parser.parse_args([])).flags] == [
        "--group-size",
        "--learning-rate",
        "--folder",
        "--label",
        "--shuffled",
        "--widths",
    ]
    help_text = " ".join(parser.format_help().split())
    assert "--group-size N candidates per group, 100% of them shown (default 4)" in help_text
    assert "--learning-rate X None: the trainer's (default none)" in help_text
    assert "--folder PATH the base model folder (default assets/base)" in help_text
    assert "--shuffled {true,false} shuffle the groups (default true)" in help_text
    assert "--widths JSON channel widths (default [8, 16])" in help_text


def test_given_flags_are_parsed_as_their_fields_types_and_override_only_their_fields() -> None:
    argv = ["--group-size", "6", "--learning-rate", "1e-3", "--folder", "a b", "--shuffled", "false"]
    args = _parser().parse_args([*argv, "--widths", "[4, 4]", "--out", "o"])
    assert given_values(args) == {
        "group_size": 6,
        "learning_rate": 0.001,
        "folder": Path("a b"),
        "shuffled": False,
        "widths": (4, 4),
    }
    config = config_from_flags(args, ToyConfig, label="orders")
    assert config == ToyConfig(
        group_size=6, learning_rate=1e-3, folder=Path("a b"), label="orders", shuffled=False, widths=(4, 4)
    )
    words = flag_arguments(args)
    assert words == [
        "--group-size",
        "6",
        "--learning-rate",
        "0.001",
        "--folder",
        "a b",
        "--shuffled",
        "false",
        "--widths",
        "[4, 4]",
    ]
    assert config_from_flags(_parser().parse_args(words), ToyConfig, label="orders") == config  # words parse back


def test_no_flag_given_builds_the_defaults_and_writes_no_words() -> None:
    args = _parser().parse_args([])
    assert config_from_flags(args, ToyConfig) == ToyConfig()
    assert given_values(args) == {} and flag_arguments(args) == []


def test_a_value_not_of_the_type_is_an_argparse_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--group-size", "four"], "argument --group-size: must be a whole number, got 'four'"),
        (["--learning-rate", "fast"], "argument --learning-rate: must be a number, got 'fast'"),
        (["--widths", "8,16"], "argument --widths: must be JSON of tuple[int, ...], got '8,16'"),
    ):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
        assert message in capsys.readouterr().err


def test_a_value_the_config_refuses_is_a_config_error_naming_flag_and_field() -> None:
    with pytest.raises(ConfigError, match=r"^--group-size: group_size must be at least 2, got 1$"):
        config_from_flags(_parser().parse_args(["--group-size", "1"]), ToyConfig)
    # An error about a field no flag set is left as the config raised it.
    with pytest.raises(ConfigError, match=r"^group_size must be at least 2, got 0$"):
        config_from_flags(_parser().parse_args(["--label", "x"]), ToyConfig, group_size=0)


def test_a_frozen_configs_required_field_is_a_required_flag(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser(SamplerConfig)
    assert "(required)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "the following arguments are required: --steps" in capsys.readouterr().err
    args = parser.parse_args(["--steps", "6", "--kind", "dpm-solver"])
    assert config_from_flags(args, SamplerConfig) == SamplerConfig(steps=6, kind="dpm-solver")


def test_a_settings_section_gives_one_flag_per_field_and_a_nested_override() -> None:
    args = _parser(Sectioned).parse_args(["--window-window-s", "2.5"])
    assert [flag.flag for flag in config_flags(args).flags] == ["--name", "--window-window-s"]
    assert given_values(args) == {"window": {"window_s": 2.5}}
    with pytest.raises(ConfigError, match=r"^--window-window-s: window\.window_s must be positive, got -1\.0$"):
        config_from_flags(_parser(Sectioned).parse_args(["--window-window-s", "-1"]), Sectioned)


def test_excluded_fields_have_no_flag_and_refusals_of_what_a_flag_cannot_carry() -> None:
    args = _parser(ToyConfig, "widths", "label").parse_args([])
    assert {flag.field for flag in config_flags(args).flags} == {"group_size", "learning_rate", "folder", "shuffled"}

    class Undescribed(FrozenConfig):
        size: int = 3

    with pytest.raises(ConfigError, match=r"Undescribed\.size has no description"):
        _parser(Undescribed)
    taken = argparse.ArgumentParser(prog="toy")
    taken.add_argument("--size", dest="group_size")
    with pytest.raises(ConfigError, match="--group-size would overwrite"):
        add_config_flags(taken, ToyConfig)
    with pytest.raises(ConfigError, match="already has the flags of ToyConfig"):
        add_config_flags(_parser(), ToyConfig)


def test_the_lazy_parser_loads_its_config_only_when_used_and_once() -> None:
    loads: list[str] = []

    def load() -> type[BaseModel]:
        loads.append("ToyConfig")
        return ToyConfig

    parser = argparse.ArgumentParser(prog="cli")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ConfigFlagsParser)
    toy = commands.add_parser("toy", help="a toy command")
    add_config_flags_when_used(toy, load)
    assert "toy" in parser.format_help() and loads == []  # the CLI's help lists the command, loads nothing
    args = parser.parse_args(["toy", "--group-size", "3"])
    assert loads == ["ToyConfig"] and config_from_flags(args, ToyConfig).group_size == 3
    assert "--group-size" in toy.format_help() and parser.parse_args(["toy"]).command == "toy"
    assert loads == ["ToyConfig"]
    # Full names only: a prefix of a flag is not taken for it.
    with pytest.raises(SystemExit):
        parser.parse_args(["toy", "--group", "3"])


def test_a_plain_parser_gets_the_flags_at_once() -> None:
    parser = argparse.ArgumentParser(prog="cli")
    add_config_flags_when_used(parser, lambda: ToyConfig)
    assert any(action.dest == "group_size" for action in parser._actions)
    with pytest.raises(ConfigError, match="without config flags"):
        config_flags(argparse.Namespace())
