"""Command-line flags generated from the fields of a configuration that a command builds in code: a
:class:`~perfusion.frozen_config.FrozenConfig`, or a :class:`~perfusion.settings.Settings` that reads only its
arguments (the evaluation's configs). A process's settings, which the environment sets too, have
:func:`perfusion.settings.add_flags`'s flags instead.

- :func:`add_config_flags` gives a parser one flag per field: ``--field-name`` (the field's name with dashes), its
  help the field's description and default, its value parsed as the field's type (a wrong one is an argparse error
  naming the flag). The namespace records which flags the parser has (:data:`CONFIG_FLAGS`).
- :class:`ConfigFlagsParser` adds them only when its parser is first used (parsed, or its help shown), so that
  building the whole CLI imports no config module: :func:`add_config_flags_when_used`.
- :func:`given_values` reads the given flags back as field values, :func:`config_from_flags` builds the config with
  them as overrides (an invalid value's ConfigError names its flag) and :func:`flag_arguments` writes them back as
  command-line words, for the reproduction command a report prints.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from perfusion.errors import ConfigError
from perfusion.settings import Settings, _text_value, flag_name, leaf_fields

CONFIG_FLAGS = "config_flags"
"""The namespace attribute that holds the :class:`ConfigFlags` of the parser that parsed it."""

Built = TypeVar("Built")
ConfigLoader = Callable[[], type[BaseModel]]
_SEQUENCES = (tuple, list, set, frozenset, dict)


@dataclass(frozen=True)
class ConfigFlag:
    """The flag of one field: ``path`` is the field's name (section names first for a nested section)."""

    path: tuple[str, ...]
    flag: str
    dest: str
    info: FieldInfo

    @property
    def field(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class ConfigFlags:
    """The config class a parser's flags set, and the flag of each of its fields, in field order."""

    config_cls: type[BaseModel]
    flags: tuple[ConfigFlag, ...]


class _FieldValue:
    """An argparse ``type``: the flag's text as a value of the field (JSON for a sequence or a section)."""

    def __init__(self, flag: str, info: FieldInfo) -> None:
        self.flag = flag
        self.info = info
        self.__name__ = flag  # argparse names a type by it in some messages

    def __call__(self, text: str) -> Any:
        annotation = self.info.annotation
        if not _takes_json(annotation):
            try:
                return _text_value(self.flag, text, self.info)
            except ConfigError as exc:
                raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{self.flag} ")) from None
        try:
            return TypeAdapter(Any if annotation is None else annotation).validate_json(text)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"must be JSON of {annotation}, got {text!r}") from None


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union other than None, or the type itself."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(member for member in typing.get_args(annotation) if member is not type(None))
    return (annotation,)


def _takes_json(annotation: Any) -> bool:
    for member in _members(annotation):
        origin = typing.get_origin(member) or member
        if origin in _SEQUENCES or (isinstance(origin, type) and issubclass(origin, BaseModel)):
            return True
    return False


def _metavar(annotation: Any) -> str:
    members = _members(annotation)
    if _takes_json(annotation):
        return "JSON"
    if all(member is int for member in members):
        return "N"
    if all(member in (int, float) for member in members):
        return "X"
    if all(member is bool for member in members):
        return "{true,false}"
    if all(isinstance(member, type) and issubclass(member, Path) for member in members):
        return "PATH"
    return "TEXT"


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, BaseModel) or (isinstance(value, _SEQUENCES) and not isinstance(value, str)):
        return json.dumps(TypeAdapter(Any).dump_python(value, mode="json"))
    return str(value)


def add_config_flags(
    parser: argparse.ArgumentParser, config_cls: type[BaseModel], exclude: Sequence[str] = ()
) -> ConfigFlags:
    """One flag per field of ``config_cls`` but those ``exclude`` names (top-level fields or sections), default None
    (not given; a field without a default is a required flag), in an argument group of their own; the namespace
    gets the :class:`ConfigFlags` as :data:`CONFIG_FLAGS`. A field without a description, or a flag whose
    destination the parser already uses, is refused: every flag's help is its field's description."""
    if CONFIG_FLAGS in parser._defaults:
        raise ConfigError(
            f"{parser.prog} already has the flags of {parser._defaults[CONFIG_FLAGS].config_cls.__name__}"
        )
    taken = {action.dest for action in parser._actions}
    group = parser.add_argument_group(
        f"{config_cls.__name__} fields",
        "each flag sets the field of its name; the fields not given keep their defaults",
    )
    flags: list[ConfigFlag] = []
    # leaf_fields expands the sections that are Settings; the field walk is the same for any pydantic model.
    for path, info in leaf_fields(cast(type[Settings], config_cls)):
        if path[0] in exclude:
            continue
        dest = "_".join(path)
        if not info.description:
            raise ConfigError(f"{config_cls.__name__}.{'.'.join(path)} has no description, which its flag's help needs")
        if dest in taken:
            raise ConfigError(f"{parser.prog}: {flag_name(path)} would overwrite the option of destination {dest!r}")
        required = info.is_required() and len(path) == 1  # a section's field may have its section's default
        shown = "required" if required else f"default {_shown(info.get_default(call_default_factory=True))}"
        flag = flag_name(path)
        group.add_argument(
            flag,
            dest=dest,
            type=_FieldValue(flag, info),
            default=None,
            required=required,
            metavar=_metavar(info.annotation),
            help=f"{info.description} ({shown})".replace("%", "%%"),
        )
        flags.append(ConfigFlag(path, flag, dest, info))
    recorded = ConfigFlags(config_cls, tuple(flags))
    parser.set_defaults(**{CONFIG_FLAGS: recorded})
    return recorded


class ConfigFlagsParser(argparse.ArgumentParser):
    """A parser that adds a config class's flags the first time it parses or shows its help or usage, so that
    building a CLI of many commands imports none of their config modules. Flags are matched by their full names
    only (``allow_abbrev=False``): a flag that was renamed fails instead of matching a longer one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._pending_config: tuple[ConfigLoader, tuple[str, ...]] | None = None

    def add_config_flags_when_used(self, load: ConfigLoader, exclude: Sequence[str] = ()) -> None:
        """Add ``load()``'s flags (:func:`add_config_flags`) when the parser is first used."""
        if self._pending_config is not None or CONFIG_FLAGS in self._defaults:
            raise ConfigError(f"{self.prog} already has the flags of a config")
        self._pending_config = (load, tuple(exclude))

    def load_config_flags(self) -> None:
        """Add the pending config flags now (once)."""
        if self._pending_config is not None:
            load, exclude = self._pending_config
            self._pending_config = None
            add_config_flags(self, load(), exclude)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.load_config_flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.load_config_flags()
        return super().format_help()

    def format_usage(self) -> str:
        self.load_config_flags()
        return super().format_usage()


def add_config_flags_when_used(
    parser: argparse.ArgumentParser, load: ConfigLoader, exclude: Sequence[str] = ()
) -> None:
    """``load()``'s flags on ``parser``: when it is first used on a :class:`ConfigFlagsParser`, at once on another."""
    if isinstance(parser, ConfigFlagsParser):
        parser.add_config_flags_when_used(load, exclude)
    else:
        add_config_flags(parser, load(), exclude)


def config_flags(args: argparse.Namespace) -> ConfigFlags:
    """The :class:`ConfigFlags` of the parser that parsed ``args``."""
    recorded = getattr(args, CONFIG_FLAGS, None)
    if not isinstance(recorded, ConfigFlags):
        raise ConfigError("these arguments were parsed by a parser without config flags (add_config_flags)")
    return recorded


def _given(args: argparse.Namespace) -> list[tuple[ConfigFlag, Any]]:
    found = ((flag, getattr(args, flag.dest, None)) for flag in config_flags(args).flags)
    return [(flag, value) for flag, value in found if value is not None]


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the given flags set, by field name (a nested section as a dict of its fields)."""
    values: dict[str, Any] = {}
    for flag, value in _given(args):
        target = values
        for section in flag.path[:-1]:
            target = target.setdefault(section, {})
        target[flag.path[-1]] = value
    return values


def config_from_flags(args: argparse.Namespace, build: Callable[..., Built], **values: Any) -> Built:
    """``build(**overrides)``: the given flags' values, then ``values`` (what other options set). ``build`` is the
    config class or one of its constructors (``quick``). A ConfigError that names a field a flag set names the flag
    too ("--sampling-steps: sampling_steps must be at least 1, got 0")."""
    try:
        return build(**{**given_values(args), **values})
    except ConfigError as exc:
        message = str(exc)
        named = [flag.flag for flag, _ in _given(args) if re.search(rf"(?<![\w.]){re.escape(flag.field)}\b", message)]
        if not named:
            raise
        raise ConfigError(f"{', '.join(named)}: {message}") from None


def flag_arguments(args: argparse.Namespace) -> list[str]:
    """The given flags and their values as command-line words, in field order: what reproduces them."""
    words: list[str] = []
    for flag, value in _given(args):
        words += [flag.flag, _shown(value)]
    return words
