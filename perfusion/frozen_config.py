"""The base of configurations that are not a process's settings: model shapes saved beside weights, samplers.

:class:`FrozenConfig` behaves as :class:`perfusion.settings.Settings` does when built in code (frozen, unknown keys
refused, every default validated, an invalid value raising :class:`~perfusion.errors.ConfigError` with one sentence
naming the field, the bound and the value, from :func:`perfusion.settings.describe_validation_error`), but it has no
``from_env``: a model's shape comes from its arguments or its config.json, never from the environment.

Saved forms: :meth:`FrozenConfig.to_dict` is what config.json holds (tuples as lists) and :meth:`FrozenConfig.from_dict`
reads it back. A key the config does not know, in code or in a saved form, is refused with the words its class
names (``saved_name``): "unknown base model config keys ['sample_sise']; known keys are [...]".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from perfusion.errors import ConfigError
from perfusion.settings import describe_validation_error


class FrozenConfig(BaseModel):
    """Frozen, validated configuration built from its arguments only; see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    saved_name: ClassVar[str] = "config"
    """What error messages call this config: "unknown <saved_name> keys [...]"."""

    def __init__(self, **values: Any) -> None:
        known = sorted(type(self).model_fields)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown {type(self).saved_name} keys {unknown}; known keys are {known}")
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(type(self), exc)) from None

    def with_overrides(self, **overrides: Any) -> Self:
        """A copy with ``overrides`` applied and validated again (``model_copy`` would not validate them)."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The saved form (config.json): every field, tuples as lists."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.model_dump().items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """The config a saved form describes; keys this config does not know are refused."""
        return cls(**values)
