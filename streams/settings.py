"""Frozen, validated configuration of the stream worker, passed explicitly to the app, the topics and the agents.

Every field has a default that runs the loop on this machine; :meth:`StreamSettings.from_env` reads the few values
an operator changes (broker address, topic prefix, partitions) from the environment. Nothing else in ``streams/``
reads the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from perfusion.errors import ConfigError
from perfusion.paths import state_dir

_TOPIC_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class StreamSettings:
    """Configuration of the Faust worker and its agents."""

    bootstrap_servers: str = field(
        default="",
        metadata={"help": "Kafka bootstrap address host:port; empty = KAFKA_BOOTSTRAP_SERVERS or the project's broker"},
    )
    topic_prefix: str = field(
        default="",
        metadata={"help": "prepended to every topic, table and consumer-group name (tests use a unique one)"},
    )
    partitions: int = field(
        default=4,
        metadata={"help": "partitions of perfusion.events and of every table's changelog; the most workers that help"},
    )
    app_id: str = field(default="perfusion-worker", metadata={"help": "Faust app id = consumer group (prefixed)"})
    data_dir: Path | None = field(
        default=None, metadata={"help": "Faust data directory; None = <state dir>/worker/<prefixed app id>"}
    )
    push_batch_max: int = field(
        default=1000, metadata={"help": "most events the preference agent folds into one Feast push"}
    )
    push_batch_within_s: float = field(
        default=0.2, metadata={"help": "seconds the preference agent waits to fill a micro-batch before pushing"}
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

    def __post_init__(self) -> None:
        if not _TOPIC_PREFIX_PATTERN.match(self.topic_prefix):
            raise ConfigError(
                f"topic_prefix may hold only letters, digits, '.', '_' and '-'; got {self.topic_prefix!r}"
            )
        _require(1 <= self.partitions <= 1024, f"partitions must be between 1 and 1024, got {self.partitions}")
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

    @classmethod
    def from_env(cls, **overrides: Any) -> StreamSettings:
        """Settings from KAFKA_BOOTSTRAP_SERVERS, PERFUSION_TOPIC_PREFIX, PERFUSION_PARTITIONS, then ``overrides``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown stream settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
            values["bootstrap_servers"] = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        if os.environ.get("PERFUSION_TOPIC_PREFIX"):
            values["topic_prefix"] = os.environ["PERFUSION_TOPIC_PREFIX"]
        if os.environ.get("PERFUSION_PARTITIONS"):
            raw = os.environ["PERFUSION_PARTITIONS"]
            if not raw.isdigit():
                raise ConfigError(f"PERFUSION_PARTITIONS must be a whole number, got {raw!r}")
            values["partitions"] = int(raw)
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
        from perfusion.infra.kafka_broker import bootstrap_servers

        return bootstrap_servers()

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else state_dir() / "worker" / self.group_id


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
