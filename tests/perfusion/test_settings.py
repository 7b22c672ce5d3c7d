"""Settings from one place: bounds and messages, derived environment names (nested sections too), flags generated
from the fields, and settings built in code that never read the environment."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import Field

from perfusion.errors import ConfigError
from perfusion.settings import Settings, add_flags, env_variable, flag_overrides


class WindowSettings(Settings):
    window_s: float = Field(default=60.0, gt=0, description="how long a window stays open (seconds)")
    keep: int = Field(default=3, ge=1, le=10, description="windows kept")


class ExampleSettings(Settings):
    bootstrap_servers: str = Field(default="", validation_alias="KAFKA_BOOTSTRAP_SERVERS", description="broker")
    partitions: int = Field(default=4, ge=1, le=1024, description="partitions")
    ratio: float = Field(default=0.5, ge=0.0, lt=1.0, description="a share")
    threshold: int | None = Field(default=None, ge=1, description="unset = wait")
    group: WindowSettings = Field(default_factory=WindowSettings, description="the window")


def test_bounds_are_named_with_the_value_in_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"^partitions must be between 1 and 1024, got 0$"):
        ExampleSettings(partitions=0)
    with pytest.raises(ConfigError, match=r"^ratio must be in \[0.0, 1.0\), got 1.0$"):
        ExampleSettings(ratio=1.0)
    with pytest.raises(ConfigError, match=r"^group.window_s must be positive, got 0$"):
        ExampleSettings(group={"window_s": 0})
    with pytest.raises(ConfigError, match=r"^threshold must be at least 1, got 0$"):
        ExampleSettings(threshold=0)
    with pytest.raises(ConfigError, match=r"unknown example settings \['partition'\]"):
        ExampleSettings(partition=3)
    with pytest.raises(ConfigError, match="unknown example settings"):
        ExampleSettings.from_env(partition=3)


def test_settings_are_frozen_and_overrides_are_validated_again() -> None:
    settings = ExampleSettings(partitions=2)
    with pytest.raises(Exception, match="frozen"):
        settings.partitions = 3  # type: ignore[misc]
    assert settings.with_overrides(partitions=8).partitions == 8
    with pytest.raises(ConfigError, match="partitions must be between 1 and 1024, got 2000"):
        settings.with_overrides(partitions=2000)


def test_environment_names_are_derived_and_read_only_by_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFUSION_PARTITIONS", "7")
    monkeypatch.setenv("PERFUSION_GROUP__WINDOW_S", "12.5")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    assert ExampleSettings().partitions == 4  # built in code: the environment is not read
    from_env = ExampleSettings.from_env(threshold=5)
    assert (from_env.partitions, from_env.group.window_s, from_env.bootstrap_servers) == (7, 12.5, "kafka.example:9092")
    assert from_env.threshold == 5 and from_env.group.keep == 3
    assert ExampleSettings.from_env(group={"keep": 9}).group == WindowSettings(window_s=12.5, keep=9)
    assert env_variable(ExampleSettings, ("group", "window_s")) == "PERFUSION_GROUP__WINDOW_S"
    assert env_variable(ExampleSettings, ("bootstrap_servers",)) == "KAFKA_BOOTSTRAP_SERVERS"
    monkeypatch.setenv("PERFUSION_PARTITIONS", "0")
    with pytest.raises(ConfigError, match="partitions must be between 1 and 1024, got 0"):
        ExampleSettings.from_env()


def test_flags_are_generated_from_the_fields_and_read_back_as_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFUSION_PARTITIONS", "7")
    parser = argparse.ArgumentParser()
    add_flags(parser, ExampleSettings, exclude=("ratio",))
    help_text = parser.format_help()
    assert "--group-window-s" in help_text and "PERFUSION_GROUP__WINDOW_S" in help_text and "--ratio" not in help_text
    args = parser.parse_args(["--group-window-s", "30", "--threshold", "none", "--bootstrap-servers", "h:1"])
    overrides = flag_overrides(args, ExampleSettings)
    assert overrides == {"group": {"window_s": 30.0}, "threshold": None, "bootstrap_servers": "h:1"}
    settings = ExampleSettings.from_env(**overrides)
    assert (settings.partitions, settings.group.window_s, settings.bootstrap_servers) == (7, 30.0, "h:1")
    with pytest.raises(ConfigError, match="--group-window-s must be a number, got 'soon'"):
        flag_overrides(parser.parse_args(["--group-window-s", "soon"]), ExampleSettings)
    with pytest.raises(ConfigError, match=r"--partitions must be a whole number, got .2\.5."):
        flag_overrides(parser.parse_args(["--partitions", "2.5"]), ExampleSettings)


@given(st.integers(min_value=-10_000, max_value=10_000))
def test_a_bounded_field_takes_exactly_the_values_inside_its_bounds(value: int) -> None:
    if 1 <= value <= 1024:
        assert ExampleSettings(partitions=value).partitions == value
    else:
        with pytest.raises(ConfigError, match=f"partitions must be between 1 and 1024, got {value}"):
            ExampleSettings(partitions=value)
