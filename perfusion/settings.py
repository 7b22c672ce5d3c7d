"""Settings of the loop's processes, from one place: frozen pydantic models with a description and bounds on every
field, read from code, from the environment (pydantic-settings) and from command-line flags generated from the
fields.

- :class:`Settings` is the base: frozen, unknown keys refused, every default validated. Building one in code reads
  only its arguments; :meth:`Settings.from_env` adds the environment. A field's variable is derived from its name:
  ``PERFUSION_<FIELD>``, and ``PERFUSION_<SECTION>__<FIELD>`` for a field of a nested section (a field whose type is
  itself a :class:`Settings`); a field may name another with ``validation_alias`` (``KAFKA_BOOTSTRAP_SERVERS``).
- Invalid values raise :class:`~perfusion.errors.ConfigError` with one sentence per problem, naming the field, the
  bound and the value ("partitions must be between 1 and 1024, got 0").
- :func:`add_flags` gives an argparse parser one ``--section-field`` flag per field (help from the description, the
  variable and the default); :func:`flag_overrides` reads them back as overrides of :meth:`Settings.from_env`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from perfusion.errors import ConfigError
from perfusion.server_files import kafka_bootstrap_servers

ENV_PREFIX = "PERFUSION_"
TOPIC_PREFIX_PATTERN = r"^[A-Za-z0-9._-]*$"
"""What a topic prefix may hold: it becomes part of topic, table and consumer-group names."""
SECTION_DELIMITER = "__"


class Settings(BaseSettings):
    """Frozen, validated settings; see the module docstring."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        populate_by_name=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=SECTION_DELIMITER,
        case_sensitive=False,
        env_ignore_empty=True,
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(type(self), exc)) from None

    @field_validator("*", mode="wrap")
    @classmethod
    def _name_the_section(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """A nested section raises its own ConfigError (its __init__ runs inside this one's validation); name the
        section in it, so that the message says ``group.window_s`` and not only ``window_s``."""
        try:
            return handler(value)
        except ConfigError as exc:
            section = info.field_name
            field = cls.model_fields[section] if section is not None else None
            nested = field.annotation if field is not None else None
            message = str(exc)
            first_word = message.split(" ", 1)[0]
            if isinstance(nested, type) and issubclass(nested, BaseModel) and first_word in nested.model_fields:
                raise ConfigError(f"{section}.{message}") from None
            raise ConfigError(f"{section}: {message}") from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Settings built in code read only their arguments: a test, or one evaluation arm of several in a process,
        # is never changed by a variable meant for another process. The environment is read by from_env alone.
        return (init_settings,)

    @classmethod
    def environment_values(cls) -> dict[str, Any]:
        """What the environment sets of these settings (nested sections as dicts), each value read as its field's
        type; a value that is not raises a ConfigError naming the variable."""
        raw = dict(EnvSettingsSource(cls)())
        values: dict[str, Any] = {}
        for path, info in leaf_fields(cls):
            found: Any = raw
            for part in path:
                found = found.get(part) if isinstance(found, Mapping) else None
            if found is None and len(path) == 1:  # an aliased field comes back under its variable's name
                found = raw.get(env_variable(cls, path))
            if isinstance(found, str):
                target = values
                for section in path[:-1]:
                    target = target.setdefault(section, {})
                target[path[-1]] = _text_value(env_variable(cls, path), found, info)
        return values

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Settings from the environment, then ``overrides`` (a None override leaves the field as it was; a dict
        override of a section updates only the fields it names)."""
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"unknown {_kind(cls)} settings {unknown}; known: {sorted(cls.model_fields)}")
        values = cls.environment_values()
        for name, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, Mapping) and isinstance(values.get(name), Mapping):
                values[name] = {**values[name], **{key: item for key, item in value.items() if item is not None}}
            else:
                values[name] = value
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Self:
        """A copy with ``overrides`` applied and validated again (``model_copy`` would not validate them)."""
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(
                f"unknown {_kind(type(self))} settings {unknown}; known: {sorted(type(self).model_fields)}"
            )
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**values, **overrides})


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
SSL_PROTOCOLS = ("SSL", "SASL_SSL")


class KafkaSecuritySettings(Settings):
    """How the loop's clients authenticate to Kafka and encrypt their connections, as a managed Kafka asks.

    Each field reads the ``KAFKA_*`` variable its description names (besides
    ``PERFUSION_KAFKA_SECURITY__<FIELD>`` as a section of a process's settings); :mod:`perfusion.kafka_security`
    turns it into the keyword arguments of kafka-python, aiokafka and Faust. The password is a secret: it is never
    part of a repr, a log line or a settings dump.
    """

    protocol: str = Field(
        default="PLAINTEXT",
        validation_alias="KAFKA_SECURITY_PROTOCOL",
        description="security.protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    )
    sasl_mechanism: str | None = Field(
        default=None,
        validation_alias="KAFKA_SASL_MECHANISM",
        description="SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512); needed by the SASL protocols",
    )
    sasl_username: str = Field(
        default="", validation_alias="KAFKA_SASL_USERNAME", description="SASL user name (PLAIN and SCRAM)"
    )
    sasl_password: SecretStr | None = Field(
        default=None,
        validation_alias="KAFKA_SASL_PASSWORD",
        description="SASL password; give it by the variable (a flag's value shows in the process list)",
    )
    ssl_cafile: Path | None = Field(
        default=None,
        validation_alias="KAFKA_SSL_CAFILE",
        description="PEM file of the CA that signed the brokers' certificates; unset = the system's CAs",
    )
    ssl_certfile: Path | None = Field(
        default=None,
        validation_alias="KAFKA_SSL_CERTFILE",
        description="PEM file of this client's certificate (mutual TLS)",
    )
    ssl_keyfile: Path | None = Field(
        default=None,
        validation_alias="KAFKA_SSL_KEYFILE",
        description="PEM file of this client's private key (mutual TLS; with ssl_certfile)",
    )
    ssl_check_hostname: bool = Field(
        default=True,
        validation_alias="KAFKA_SSL_CHECK_HOSTNAME",
        description="check that a broker's certificate names the host connected to",
    )

    @field_validator("protocol", "sasl_mechanism", mode="after")
    @classmethod
    def _known_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        known = KAFKA_SECURITY_PROTOCOLS if info.field_name == "protocol" else SASL_MECHANISMS
        if value.upper() not in known:
            raise ValueError(f"{info.field_name} must be one of {', '.join(known)}, got {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        sasl = self.protocol in SASL_PROTOCOLS
        if sasl and self.sasl_mechanism is None:
            raise ValueError(
                f"sasl_mechanism must be set for protocol {self.protocol}: one of {', '.join(SASL_MECHANISMS)} "
                "(KAFKA_SASL_MECHANISM)"
            )
        given = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password") if getattr(self, name)]
        if not sasl and given:
            raise ValueError(
                f"{given[0]} needs protocol SASL_PLAINTEXT or SASL_SSL, got {self.protocol} (KAFKA_SECURITY_PROTOCOL)"
            )
        if sasl and (not self.sasl_username or not self.sasl_password or not self.sasl_password.get_secret_value()):
            raise ValueError(
                f"sasl_username and sasl_password must both be set for sasl_mechanism {self.sasl_mechanism} "
                "(KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD)"
            )
        files = {"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile, "ssl_keyfile": self.ssl_keyfile}
        given = [name for name, path in files.items() if path is not None]
        if given and self.protocol not in SSL_PROTOCOLS:
            raise ValueError(f"{given[0]} needs protocol SSL or SASL_SSL, got {self.protocol}")
        for name in given:
            path = files[name]
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} does not exist or is not a file (KAFKA_{name.upper()})")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile, the certificate of that key (KAFKA_SSL_CERTFILE)")
        return self

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in SASL_PROTOCOLS

    @property
    def uses_ssl(self) -> bool:
        return self.protocol in SSL_PROTOCOLS


class KafkaClientSettings(Settings):
    """What every process that talks to the loop's Kafka shares: the broker, its security, the topic prefix, and
    how the loop's topics are replicated when a process creates them."""

    bootstrap_servers: str = Field(
        default="",
        validation_alias="KAFKA_BOOTSTRAP_SERVERS",
        description="Kafka bootstrap address host:port; empty = the project's running broker",
    )
    topic_prefix: str = Field(
        default="",
        pattern=TOPIC_PREFIX_PATTERN,
        description="prepended to every topic, table and consumer-group name (tests use a unique one)",
    )
    kafka_security: KafkaSecuritySettings = Field(
        default_factory=KafkaSecuritySettings,
        description="security protocol, SASL credentials and TLS files of every Kafka client",
    )
    topic_replication_factor: int = Field(
        default=1,
        ge=1,
        le=32,
        description="replicas of each topic the loop creates (its topics, Faust's changelogs and internal topics); "
        "1 for the local broker, 3 on a production cluster",
    )
    topic_min_insync_replicas: int = Field(
        default=1,
        ge=1,
        le=32,
        description="min.insync.replicas of each topic the loop creates: the replicas an acks=all write waits for; "
        "at most topic_replication_factor (2 with 3 replicas)",
    )

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> Self:
        if self.topic_min_insync_replicas > self.topic_replication_factor:
            raise ValueError(
                f"topic_min_insync_replicas must be at most topic_replication_factor "
                f"({self.topic_replication_factor}), got {self.topic_min_insync_replicas}: no write could succeed"
            )
        return self

    @classmethod
    def environment_values(cls) -> dict[str, Any]:
        """As :meth:`Settings.environment_values`, with the security section also read from the ``KAFKA_*``
        variables an operator knows (``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_PASSWORD``, ...); a
        ``PERFUSION_KAFKA_SECURITY__<FIELD>`` variable wins over its ``KAFKA_*`` name."""
        values = super().environment_values()
        from_kafka_names = KafkaSecuritySettings.environment_values()
        if from_kafka_names:
            values["kafka_security"] = {**from_kafka_names, **values.get("kafka_security", {})}
        return values

    def resolved_bootstrap_servers(self) -> str:
        """The broker address: this setting, else the project's running broker (:mod:`perfusion.server_files`)."""
        return self.bootstrap_servers or kafka_bootstrap_servers()


def _kind(settings_cls: type[BaseModel]) -> str:
    """ "stream" for StreamSettings, "pretrain" for PretrainConfig: the word error messages use."""
    return settings_cls.__name__.removesuffix("Settings").removesuffix("Config").lower() or "the"


def env_variable(settings_cls: type[Settings], path: Sequence[str]) -> str:
    """The environment variable of the field at ``path`` (section names, then the field's name)."""
    first = settings_cls.model_fields[path[0]]
    alias = first.validation_alias
    if len(path) == 1 and isinstance(alias, AliasChoices):
        return str(alias.choices[-1])
    if len(path) == 1 and isinstance(alias, str):
        return alias
    prefix = str(settings_cls.model_config.get("env_prefix", ENV_PREFIX))
    return prefix + SECTION_DELIMITER.join(path).upper()


# ------------------------------------------------------------------------------------------------ error messages


def _field_at(settings_cls: type[BaseModel], location: Sequence[int | str]) -> tuple[str, FieldInfo | None]:
    """The field a validation error's location names (through nested sections), and its dotted name."""
    model: type[BaseModel] | None = settings_cls
    info: FieldInfo | None = None
    names: list[str] = []
    for part in location:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            names.append(str(part))
            info = None
            continue
        info = model.model_fields[part]
        names.append(part)
        annotation = info.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(names), info


def _bounds(info: FieldInfo | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for constraint in info.metadata if info is not None else ():
        for name in ("gt", "ge", "lt", "le"):
            value = getattr(constraint, name, None)
            if value is not None:
                found[name] = value
    return found


def _bound_sentence(name: str, bounds: Mapping[str, Any], value: Any) -> str:
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    if "ge" in bounds and "le" in bounds:
        return f"{name} must be between {bounds['ge']} and {bounds['le']}, got {value}"
    if low is not None and high is not None:
        opening = "[" if "ge" in bounds else "("
        closing = "]" if "le" in bounds else ")"
        return f"{name} must be in {opening}{low}, {high}{closing}, got {value}"
    if bounds.get("gt") == 0:
        return f"{name} must be positive, got {value}"
    if "ge" in bounds:
        return f"{name} must be at least {bounds['ge']}, got {value}"
    if "gt" in bounds:
        return f"{name} must be above {bounds['gt']}, got {value}"
    if "le" in bounds:
        return f"{name} must be at most {bounds['le']}, got {value}"
    return f"{name} must be below {bounds['lt']}, got {value}"


def describe_validation_error(settings_cls: type[BaseModel], error: ValidationError) -> str:
    """One sentence per problem, naming the field, what it must be and what it got."""
    sentences: list[str] = []
    unknown: list[str] = []
    for problem in error.errors(include_url=False):
        name, info = _field_at(settings_cls, problem["loc"])
        kind = problem["type"]
        value = problem.get("input")
        if kind == "extra_forbidden":
            unknown.append(name)
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            sentences.append(_bound_sentence(name, _bounds(info), value))
        elif kind == "value_error":
            sentences.append(str(problem["msg"]).removeprefix("Value error, "))
        else:
            sentences.append(f"{name}: {problem['msg']}, got {value!r}" if name else str(problem["msg"]))
    if unknown:
        known = sorted(settings_cls.model_fields)
        sentences.insert(0, f"unknown {_kind(settings_cls)} settings {unknown}; known: {known}")
    return "; ".join(sentences)


# ---------------------------------------------------------------------------------------------------------- flags


def leaf_fields(settings_cls: type[Settings]) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """(path, field) of every leaf field, sections first expanded into their fields."""
    for name, info in settings_cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Settings):
            yield from (((name, *path), leaf) for path, leaf in leaf_fields(annotation))
        else:
            yield (name,), info


def flag_name(path: Sequence[str]) -> str:
    return "--" + "-".join(path).replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser,
    settings_cls: type[Settings],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """One flag per field of ``settings_cls``, default None (not given); ``include`` / ``exclude`` name top-level
    fields or sections."""
    for path, info in leaf_fields(settings_cls):
        if (include is not None and path[0] not in include) or path[0] in exclude:
            continue
        default = info.get_default(call_default_factory=True)
        shown_default = "unset" if default in ("", None) else default
        parser.add_argument(
            flag_name(path),
            dest="_".join(path),
            default=None,
            metavar="_".join(path).upper(),
            help=f"{info.description} (env {env_variable(settings_cls, path)}; default {shown_default})",
        )


def flag_overrides(args: argparse.Namespace, settings_cls: type[Settings]) -> dict[str, Any]:
    """The flags of :func:`add_flags` that were given, each checked against its field's type, as overrides (nested
    sections as dicts) for :meth:`Settings.from_env`."""
    overrides: dict[str, Any] = {}
    for path, info in leaf_fields(settings_cls):
        raw = getattr(args, "_".join(path), None)  # absent for excluded fields
        if raw is None:
            continue
        value = _text_value(flag_name(path), raw, info)
        target = overrides
        for section in path[:-1]:
            target = target.setdefault(section, {})
        target[path[-1]] = value
    return overrides


def _text_value(source: str, raw: str, info: FieldInfo) -> Any:
    """``raw`` (a flag's or a variable's text, ``source`` names which) as a value of the field ``info``."""
    text = raw.strip()
    annotation = info.annotation
    if text.lower() in ("", "none") and not info.is_required() and info.get_default() is None:
        return None
    try:
        return TypeAdapter(Any if annotation is None else annotation).validate_strings(text)
    except ValidationError:
        number = annotation in (int, float) or str(annotation) in ("int | None", "float | None")
        kind = "a whole number" if "int" in str(annotation) else "a number" if number else f"a {annotation}"
        raise ConfigError(f"{source} must be {kind}, got {raw!r}") from None
