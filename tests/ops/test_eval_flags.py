"""``perfusion eval MODE``'s flags are its config's fields: each field has its flag, the flag sets that field, a
wrong value is refused naming the flag, and the reproduction command names the flags as they are now."""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ops.cli import build_parser
from perfusion.config_flags import config_flags, config_from_flags, flag_arguments
from perfusion.errors import ConfigError
from simulator.eval.config import EvaluationConfig
from simulator.probes.generator_probe import ProbeConfig
from simulator.probes.reward_probe import RewardProbeConfig
from simulator.probes.sampler_probe import SamplerProbeConfig
from simulator.probes.signal import SignalConfig
from simulator.science.config import ScienceConfig

# Mode -> its config, and the fields given by an option of their own (``--arms``, a list) instead of a config flag.
MODES: dict[str, tuple[type[BaseModel], frozenset[str]]] = {
    "loop": (EvaluationConfig, frozenset({"arms"})),
    "probe": (ProbeConfig, frozenset({"arms"})),
    "reward-probe": (RewardProbeConfig, frozenset()),
    "sampler": (SamplerProbeConfig, frozenset()),
    "signal": (SignalConfig, frozenset()),
    "science": (ScienceConfig, frozenset({"arms"})),
}


@functools.cache
def _parser() -> argparse.ArgumentParser:
    return build_parser()


def _parse(argv: list[str]) -> argparse.Namespace:
    return _parser().parse_args(argv)


def _candidates(default: Any, info: FieldInfo) -> list[Any]:
    """Values of the field's type other than its default, nearest first."""
    text = str(info.annotation)
    if "bool" in text:
        return [not default]
    if "int" in text:
        return [3, 5] if default is None else [default + 1, default - 1, default * 2]
    if "float" in text:
        return [0.25, 0.5] if default is None else [default / 2 + 0.125, default * 2 + 0.5]
    if "Path" in text:
        return [Path("elsewhere") / "base"]
    return ["true-utility", "my_panels:Panel", "other"]


def _other_value(config_cls: type[BaseModel], name: str, info: FieldInfo) -> Any:
    """A value the config accepts for ``name`` that is not its default."""
    default = info.get_default(call_default_factory=True)
    for candidate in _candidates(default, info):
        try:
            built = config_cls(**{name: candidate})
        except ConfigError:
            continue
        if getattr(built, name) == candidate != default:
            return candidate
    raise AssertionError(f"no valid value other than the default for {config_cls.__name__}.{name}")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_config_field_has_its_flag_with_its_description(mode: str) -> None:
    config_cls, by_hand = MODES[mode]
    flags = config_flags(_parse(["eval", mode])).flags
    assert config_flags(_parse(["eval", mode])).config_cls is config_cls
    assert [flag.field for flag in flags] == [name for name in config_cls.model_fields if name not in by_hand]
    help_text = " ".join(_parse_help(mode).split())
    for flag in flags:
        assert flag.flag == "--" + flag.field.replace("_", "-")
        assert flag.info.description and " ".join(flag.info.description.split()) in help_text, flag.flag


def _parse_help(mode: str) -> str:
    parser = _parser()
    eval_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    modes = next(a for a in eval_parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return str(modes[mode].format_help())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_flag_sets_its_field_and_only_it(mode: str) -> None:
    config_cls, _ = MODES[mode]
    defaults = config_cls()
    for flag in config_flags(_parse(["eval", mode])).flags:
        value = _other_value(config_cls, flag.field, flag.info)
        args = _parse(["eval", mode, flag.flag, str(value)])
        config = config_from_flags(args, config_cls)
        assert getattr(config, flag.field) == value, flag.flag
        for other in config_cls.model_fields:
            if other != flag.field:
                assert getattr(config, other) == getattr(defaults, other), (flag.flag, other)
        assert flag_arguments(args) == [flag.flag, str(value)]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_value_not_of_the_fields_type_is_an_argparse_error_naming_the_flag(
    mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = next(f for f in config_flags(_parse(["eval", mode])).flags if "int" in str(f.info.annotation))
    with pytest.raises(SystemExit) as exc:
        _parse(["eval", mode, flag.flag, "many"])
    assert exc.value.code == 2
    assert f"argument {flag.flag}: must be a whole number, got 'many'" in capsys.readouterr().err


def test_a_value_out_of_the_fields_bounds_is_a_config_error_naming_the_flag() -> None:
    with pytest.raises(
        ConfigError, match="^" + re.escape("--bootstrap-samples: bootstrap_samples must be at least 100, got 10") + "$"
    ):
        config_from_flags(_parse(["eval", "science", "--bootstrap-samples", "10"]), ScienceConfig)
    with pytest.raises(
        ConfigError, match="^" + re.escape("--sampling-steps: sampling_steps must be at least 1, got 0") + "$"
    ):
        config_from_flags(_parse(["eval", "loop", "--sampling-steps", "0"]), EvaluationConfig.quick)
    # A rule over two fields names both flags.
    with pytest.raises(ConfigError, match="^" + re.escape("--k, --best-of: need 2 <= k <= best_of")):
        config_from_flags(_parse(["eval", "science", "--k", "12", "--best-of", "8"]), ScienceConfig)
    with pytest.raises(ConfigError, match="^" + re.escape("--labels: probe labels must be one of")):
        config_from_flags(_parse(["eval", "probe", "--labels", "likes"]), ProbeConfig)


def test_a_flag_applies_over_quick_and_arms_are_their_own_option() -> None:
    args = _parse(["eval", "science", "--quick", "--arms", "base", "perfusion", "--sampling-steps", "3"])
    config = config_from_flags(args, ScienceConfig.quick, arms=tuple(args.arms))
    assert config == ScienceConfig.quick(arms=("base", "perfusion"), sampling_steps=3)


def test_the_old_flag_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Full names only: --draws must not pass as an abbreviation of --draws-per-group.
    for argv in (["science", "--draws", "2"], ["loop", "--steps", "2"], ["sampler", "--seeds", "2"]):
        with pytest.raises(SystemExit):
            _parse(["eval", *argv])
        assert f"unrecognized arguments: {argv[1]}" in capsys.readouterr().err


def test_the_reproduction_commands_name_the_new_flags() -> None:
    from ops.commands import eval as eval_command
    from ops.commands import eval_sampler, eval_science, eval_signal

    args = _parse(["eval", "science", "--quick", "--arms", "base", "--diffusion-steps", "4", "--draws-per-group", "2"])
    assert eval_science.command_line(args) == (
        "perfusion eval science --quick --arms base --diffusion-steps 4 --draws-per-group 2"
    )
    args = _parse(["eval", "loop", "--parallel-arms", "2", "--train-users", "5", "--out", "o", "--work-dir", "w"])
    assert eval_command.command_line(args) == "perfusion eval loop --train-users 5 --parallel-arms 2"
    args = _parse(["eval", "reward-probe", "--steps", "30"])
    assert eval_command.command_line(args) == "perfusion eval reward-probe --steps 30"
    args = _parse(["eval", "sampler", "--torch-threads", "1", "--base-checkpoint", "a b"])
    assert eval_sampler.command_line(args) == "perfusion eval sampler --torch-threads 1 --base-checkpoint 'a b'"
    args = _parse(["eval", "signal", "--bootstrap-samples", "200", "--docs", "d.md"])
    assert eval_signal.command_line(args) == "perfusion eval signal --bootstrap-samples 200"


def test_help_of_the_cli_and_of_every_eval_mode_imports_no_heavy_library() -> None:
    code = (
        "import contextlib, io, sys\n"
        "from ops.cli import build_parser\n"
        "for argv in (['--help'], *(['eval', mode, '--help'] for mode in sys.argv[1:])):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        build_parser().parse_args(argv)\n"
        "    assert 'usage: perfusion' in out.getvalue(), argv\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'faust', 'feast') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *MODES], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
