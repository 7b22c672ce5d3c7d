"""Frozen, validated configuration of the stream worker, passed explicitly to the app, the topics and the agents.

Every field has a default that runs the loop on this machine. A field whose metadata names an ``env`` variable can
be set from the environment (:meth:`StreamSettings.from_env`) and from a ``perfusion worker --flag`` of the same
name (:data:`OPERATOR_FIELDS`); nothing else in ``streams/`` reads the environment. The agents' own settings
(:class:`~streams.grouping.GroupingSettings`, :class:`~streams.demand.DemandSettings`,
:class:`~streams.training_trigger.TrainingTriggerSettings`) are derived from the ``group_*``, ``demand_*`` and
``train_*`` fields by :meth:`StreamSettings.grouping`, :meth:`StreamSettings.demand` and
:meth:`StreamSettings.training_trigger`, which also validate them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from perfusion.errors import ConfigError
from perfusion.paths import state_dir

if TYPE_CHECKING:
    from streams.demand import DemandSettings
    from streams.grouping import GroupingSettings
    from streams.training_trigger import TrainingTriggerSettings

_Settings = TypeVar("_Settings")
_TOPIC_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class StreamSettings:
    """Configuration of the Faust worker and its agents."""

    bootstrap_servers: str = field(
        default="",
        metadata={
            "help": "Kafka bootstrap address host:port; empty = the project's broker",
            "env": "KAFKA_BOOTSTRAP_SERVERS",
        },
    )
    topic_prefix: str = field(
        default="",
        metadata={
            "help": "prepended to every topic, table and consumer-group name (tests use a unique one)",
            "env": "PERFUSION_TOPIC_PREFIX",
        },
    )
    partitions: int = field(
        default=4,
        metadata={
            "help": "partitions of perfusion.events and of every table's changelog; the most workers that help",
            "env": "PERFUSION_PARTITIONS",
        },
    )
    app_id: str = field(default="perfusion-worker", metadata={"help": "Faust app id = consumer group (prefixed)"})
    data_dir: Path | None = field(
        default=None, metadata={"help": "Faust data directory; None = <state dir>/worker/<prefixed app id>"}
    )
    session_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "seconds before the broker gives a silent worker's partitions to the others (a killed worker's "
            "partitions wait this long); at least the broker's group.min.session.timeout.ms (6 s)",
            "env": "PERFUSION_SESSION_TIMEOUT_S",
        },
    )
    push_batch_max: int = field(
        default=1000,
        metadata={
            "help": "most events the preference agent folds into one Feast push",
            "env": "PERFUSION_PUSH_BATCH_MAX",
        },
    )
    push_batch_within_s: float = field(
        default=0.2,
        metadata={
            "help": "seconds the preference agent waits to fill a micro-batch before pushing",
            "env": "PERFUSION_PUSH_BATCH_WITHIN_S",
        },
    )
    preference_half_life_s: float = field(
        default=86_400.0,
        metadata={"help": "event-time half-life of an interaction's weight in the preference vector (seconds)"},
    )
    click_weight: float = field(default=1.0, metadata={"help": "weight of a click in the preference vector"})
    order_weight: float = field(
        default=3.0, metadata={"help": "weight of an order in the preference vector; a return subtracts it"}
    )
    seen_event_ids: int = field(
        default=512, metadata={"help": "per user, how many recent event ids are remembered to drop duplicates"}
    )
    remembered_impressions: int = field(
        default=256,
        metadata={"help": "per user, how many recent impressions keep their candidates' descriptors"},
    )
    group_window_s: float = field(
        default=1800.0,
        metadata={
            "help": "group builder: follow-ups within this many event-time seconds after an impression count for it",
            "env": "PERFUSION_GROUP_WINDOW_S",
        },
    )
    group_allowed_lateness_s: float = field(
        default=60.0,
        metadata={
            "help": "group builder: the watermark trails the largest event time seen by this many seconds",
            "env": "PERFUSION_GROUP_LATENESS_S",
        },
    )
    group_closed_retention_s: float = field(
        default=3600.0,
        metadata={
            "help": "group builder: a closed group is remembered this long (event time) to recognise replays",
            "env": "PERFUSION_GROUP_RETENTION_S",
        },
    )
    group_idle_after_s: float = field(
        default=120.0,
        metadata={
            "help": "group builder: after this many wall-clock seconds without events a partition's watermark moves "
            "on with the wall clock, so its last groups close (0 = never)",
            "env": "PERFUSION_GROUP_IDLE_AFTER_S",
        },
    )
    demand_allowed_lateness_s: float = field(
        default=60.0,
        metadata={
            "help": "demand: orders and returns are applied once the watermark, trailing by this many seconds, passed",
            "env": "PERFUSION_DEMAND_LATENESS_S",
        },
    )
    demand_idle_after_s: float = field(
        default=120.0,
        metadata={
            "help": "demand: a source partition without progress for this many wall-clock seconds moves on with the "
            "wall clock, so an order that crosses a threshold fires without other traffic (0 = never)",
            "env": "PERFUSION_DEMAND_IDLE_AFTER_S",
        },
    )
    demand_default_threshold: int | None = field(
        default=None,
        metadata={
            "help": "demand: net orders that start production of a design whose DesignCreated was not seen; "
            "unset = wait for it",
            "env": "PERFUSION_DEMAND_DEFAULT_THRESHOLD",
        },
    )
    train_samples_per_request: int = field(
        default=256,
        metadata={
            "help": "training trigger: new group samples of one model version that make a TrainRequest due (N)",
            "env": "PERFUSION_TRAIN_SAMPLES",
        },
    )
    train_max_wait_s: float = field(
        default=300.0,
        metadata={
            "help": "training trigger: wall-clock seconds a pending sample waits at most before a TrainRequest (T)",
            "env": "PERFUSION_TRAIN_MAX_WAIT_S",
        },
    )
    train_tick_s: float = field(
        default=1.0,
        metadata={
            "help": "training trigger: how often (seconds) the T deadline is checked without new samples",
            "env": "PERFUSION_TRAIN_TICK_S",
        },
    )

    def __post_init__(self) -> None:
        if not _TOPIC_PREFIX_PATTERN.match(self.topic_prefix):
            raise ConfigError(
                f"topic_prefix may hold only letters, digits, '.', '_' and '-'; got {self.topic_prefix!r}"
            )
        _require(1 <= self.partitions <= 1024, f"partitions must be between 1 and 1024, got {self.partitions}")
        _require(
            6.0 <= self.session_timeout_s <= 1800.0,
            f"session_timeout_s must be between 6 and 1800 seconds, got {self.session_timeout_s}",
        )
        _require(self.push_batch_max >= 1, f"push_batch_max must be at least 1, got {self.push_batch_max}")
        _require(
            0.0 < self.push_batch_within_s <= 60.0,
            f"push_batch_within_s must be in (0, 60] seconds, got {self.push_batch_within_s}",
        )
        _require(
            self.preference_half_life_s > 0.0,
            f"preference_half_life_s must be positive, got {self.preference_half_life_s}",
        )
        _require(self.click_weight > 0.0, f"click_weight must be positive, got {self.click_weight}")
        _require(self.order_weight > 0.0, f"order_weight must be positive, got {self.order_weight}")
        _require(self.seen_event_ids >= 1, f"seen_event_ids must be at least 1, got {self.seen_event_ids}")
        _require(
            self.remembered_impressions >= 1,
            f"remembered_impressions must be at least 1, got {self.remembered_impressions}",
        )
        # The agents' settings validate their own values; build them once so a bad value fails here.
        self.grouping()
        self.demand()
        self.training_trigger()

    @classmethod
    def from_env(cls, **overrides: Any) -> StreamSettings:
        """Settings from the environment variable of each field that names one, then ``overrides`` (None = unset)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown stream settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for settings_field in OPERATOR_FIELDS:
            raw = os.environ.get(settings_field.metadata["env"], "")
            if raw.strip():
                values[settings_field.name] = parse_field_value(
                    settings_field, raw, source=settings_field.metadata["env"]
                )
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> StreamSettings:
        return replace(self, **overrides)

    @property
    def group_id(self) -> str:
        return f"{self.topic_prefix}{self.app_id}"

    def resolved_bootstrap_servers(self) -> str:
        """The broker address: this setting, else the project's running broker."""
        if self.bootstrap_servers:
            return self.bootstrap_servers
        from perfusion.server_files import kafka_bootstrap_servers as bootstrap_servers

        return bootstrap_servers()

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else state_dir() / "worker" / self.group_id

    def grouping(self) -> GroupingSettings:
        """The group builder's attribution window."""
        from streams.grouping import GroupingSettings

        return _build(
            "group_",
            lambda: GroupingSettings(
                window_s=self.group_window_s,
                allowed_lateness_s=self.group_allowed_lateness_s,
                closed_retention_s=self.group_closed_retention_s,
                idle_after_s=self.group_idle_after_s,
            ),
        )

    def demand(self) -> DemandSettings:
        """How the demand agent counts net orders."""
        from streams.demand import DemandSettings

        return _build(
            "demand_",
            lambda: DemandSettings(
                allowed_lateness_s=self.demand_allowed_lateness_s,
                default_threshold=self.demand_default_threshold,
                idle_after_s=self.demand_idle_after_s,
            ),
        )

    def training_trigger(self) -> TrainingTriggerSettings:
        """When the training trigger asks for an update (N samples or T seconds)."""
        from streams.training_trigger import TrainingTriggerSettings

        return _build(
            "train_",
            lambda: TrainingTriggerSettings(
                samples_per_request=self.train_samples_per_request,
                max_wait_s=self.train_max_wait_s,
                tick_s=self.train_tick_s,
            ),
        )


OPERATOR_FIELDS: tuple[Field[Any], ...] = tuple(f for f in fields(StreamSettings) if "env" in f.metadata)
"""The fields an operator sets from the environment or from ``perfusion worker`` flags."""

_PARSERS: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float, "int | None": int}


def parse_field_value(settings_field: Field[Any], raw: str, source: str) -> Any:
    """``raw`` (from an environment variable or a flag, named by ``source``) as the value of ``settings_field``."""
    type_name = str(settings_field.type)
    parser = _PARSERS.get(type_name)
    if parser is None:
        raise ConfigError(f"{settings_field.name} ({type_name}) cannot be read from text; set it in code")
    text = raw.strip()
    if type_name.endswith("| None") and text.lower() in ("", "none"):
        return None
    try:
        return parser(text)
    except ValueError:
        kind = "a whole number" if parser is int else "a number" if parser is float else "text"
        raise ConfigError(f"{source} must be {kind}, got {raw!r}") from None


def _build(prefix: str, make: Callable[[], _Settings]) -> _Settings:
    try:
        return make()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (stream settings {prefix}*)") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
