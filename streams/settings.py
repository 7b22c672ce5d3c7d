"""Frozen, validated configuration of the stream worker, passed explicitly to the app, the topics and the agents.

Every field has a default that runs the loop on this machine. The agents' own settings are sections of it, not
copies: ``group`` (:class:`~streams.grouping.GroupingSettings`), ``demand``
(:class:`~streams.demand.DemandSettings`) and ``train`` (:class:`~streams.training_trigger.TrainingTriggerSettings`).
:meth:`StreamSettings.from_env` reads the environment (``KAFKA_BOOTSTRAP_SERVERS``, ``PERFUSION_<FIELD>``, and
``PERFUSION_<SECTION>__<FIELD>`` for a section's, e.g. ``PERFUSION_GROUP__WINDOW_S``), and ``perfusion worker`` has a
flag for every field (``--group-window-s``), :mod:`perfusion.settings`; nothing else in ``streams/`` reads the
environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from perfusion.paths import state_dir
from perfusion.settings import KafkaClientSettings
from streams.demand import DemandSettings
from streams.feast_sink import FeastWriter
from streams.grouping import GroupingSettings
from streams.training_trigger import TrainingTriggerSettings


class StreamSettings(KafkaClientSettings):
    """Configuration of the Faust worker and its agents."""

    partitions: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="partitions of perfusion.events and of every table's changelog; the most workers that help",
    )
    app_id: str = Field(default="perfusion-worker", description="Faust app id = consumer group (prefixed)")
    data_dir: Path | None = Field(
        default=None, description="Faust data directory; None = <state dir>/worker/<prefixed app id>"
    )
    session_timeout_s: float = Field(
        default=60.0,
        ge=6.0,
        le=1800.0,
        description="seconds before the broker gives a silent worker's partitions to the others (a killed worker's "
        "partitions wait this long); at least the broker's group.min.session.timeout.ms (6 s)",
    )
    push_batch_max: int = Field(
        default=1000, ge=1, description="most events the preference agent folds into one Feast push"
    )
    push_batch_within_s: float = Field(
        # 0.1 s, not 0.2: chosen on seed 1 of `perfusion bench streams` by the rule in docs/streams-performance.md
        default=0.1,
        gt=0.0,
        le=60.0,
        description="seconds the events agent waits to fill a micro-batch before folding it",
    )
    feast_writer: FeastWriter = Field(
        default="process",
        description="where the preference stage's Feast pushes run: 'process' (a child process of the worker, on "
        "another core than the event loop) or 'thread' (a thread of the worker, sharing its GIL)",
    )
    preference_half_life_s: float = Field(
        default=86_400.0,
        gt=0.0,
        description="event-time half-life of an interaction's weight in the preference vector (seconds)",
    )
    click_weight: float = Field(default=1.0, gt=0.0, description="weight of a click in the preference vector")
    order_weight: float = Field(
        default=3.0, gt=0.0, description="weight of an order in the preference vector; a return subtracts it"
    )
    seen_event_ids: int = Field(
        default=512, ge=1, description="per user, how many recent event ids are remembered to drop duplicates"
    )
    remembered_impressions: int = Field(
        default=256, ge=1, description="per user, how many recent impressions keep their candidates' descriptors"
    )
    http_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="port of the worker's HTTP endpoints (/healthz, /readyz, /metrics); 0 = none, so that several "
        "workers run on one machine without choosing ports (give each its own port to scrape them)",
    )
    http_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="address the HTTP endpoints listen on (0.0.0.0 for every interface, as in a container)",
    )
    json_logs: bool = Field(
        default=False,
        description="log one JSON object per line (time, level, logger, message, and topic, partition and offset "
        "when the message names where a record was read) instead of text",
    )
    group: GroupingSettings = Field(
        default_factory=GroupingSettings, description="the group builder's attribution window (event time)"
    )
    demand: DemandSettings = Field(default_factory=DemandSettings, description="how net orders are counted per design")
    train: TrainingTriggerSettings = Field(
        default_factory=TrainingTriggerSettings, description="when the training trigger asks for an update"
    )

    @property
    def group_id(self) -> str:
        return f"{self.topic_prefix}{self.app_id}"

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else state_dir() / "worker" / self.group_id
