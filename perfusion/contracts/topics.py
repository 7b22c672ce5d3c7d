"""Every Kafka topic of the loop, named in one place.

Inbound events of all kinds share ``perfusion.events``, keyed by ``user_id`` so that one user's events stay ordered
in one partition. Outbound records have one topic each, keyed so that a replay overwrites rather than duplicates
(group samples and group drops by impression id, production orders by design id, training requests by request id).
Three topics are read as their latest record per key and created compacted (``cleanup.policy=compact``,
:meth:`TopicNames.compacted`), so that the broker keeps one record per key for as long as the topic lives instead of
deleting records by age:

- ``perfusion.design-demand``: each design's demand state (the worker's demand agent sends one whenever it changes),
  keyed by design id; the service's design registry keeps the latest record per design.
- ``perfusion.production-orders``: at most one order per design, keyed by design id; a replay after a crash repeats
  the same order under the same key, which compaction folds into one.
- ``perfusion.model-updates``: one ``ModelUpdated`` per published version, keyed by the version; the service only
  takes a record as a hint to read the store's LATEST, and the demo lists the versions announced.

Names take a ``topic_prefix`` (the settings' ``topic_prefix``; tests use a unique prefix per test).
:func:`ensure_topics` creates them with kafka-python's admin client before anything produces, so a producer never
auto-creates a one-partition topic; it takes the replication factor, ``min.insync.replicas`` and the client's
security from the process's :class:`~perfusion.settings.KafkaClientSettings`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from perfusion.errors import ConfigError, InfrastructureError
from perfusion.kafka_security import kafka_python_kwargs
from perfusion.settings import KafkaClientSettings

log = logging.getLogger(__name__)

EVENTS = "perfusion.events"
DEAD_LETTERS = "perfusion.dlq"
GROUP_SAMPLES = "perfusion.group-samples"
GROUP_DROPS = "perfusion.group-drops"
PRODUCTION_ORDERS = "perfusion.production-orders"
TRAIN_REQUESTS = "perfusion.train-requests"
MODEL_UPDATES = "perfusion.model-updates"
DESIGN_DEMAND = "perfusion.design-demand"


@dataclass(frozen=True)
class TopicNames:
    """The prefixed name of each topic."""

    events: str
    dead_letters: str
    group_samples: str
    group_drops: str
    production_orders: str
    train_requests: str
    model_updates: str
    design_demand: str

    @classmethod
    def for_prefix(cls, prefix: str) -> TopicNames:
        return cls(
            events=prefix + EVENTS,
            dead_letters=prefix + DEAD_LETTERS,
            group_samples=prefix + GROUP_SAMPLES,
            group_drops=prefix + GROUP_DROPS,
            production_orders=prefix + PRODUCTION_ORDERS,
            train_requests=prefix + TRAIN_REQUESTS,
            model_updates=prefix + MODEL_UPDATES,
            design_demand=prefix + DESIGN_DEMAND,
        )

    @classmethod
    def of_topic(cls, *names: str) -> TopicNames:
        """The topics of the loop that ``names`` (topics of one loop, each a prefix and a base name) belong to."""
        bases = [getattr(cls.for_prefix(""), f.name) for f in fields(cls)]
        prefixes = set()
        for name in names:
            prefix = next((name.removesuffix(base) for base in bases if name.endswith(base)), None)
            if prefix is None:
                raise ConfigError(f"{name!r} is not a topic of the loop; its name ends with one of {', '.join(bases)}")
            prefixes.add(prefix)
        if len(prefixes) != 1:
            raise ConfigError(f"name topics of one loop (one prefix), got {', '.join(map(repr, names)) or 'none'}")
        return cls.for_prefix(prefixes.pop())

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]

    def compacted(self) -> list[str]:
        """The topics whose latest record per key is all a reader needs: created with ``cleanup.policy=compact``."""
        return [self.design_demand, self.production_orders, self.model_updates]


def topic_options(
    names: TopicNames, name: str, partitions: int, client: KafkaClientSettings | None = None
) -> dict[str, object]:
    """What :func:`ensure_topics` creates topic ``name`` with (kafka-python's ``create_topics`` options): the
    replication factor and ``min.insync.replicas`` of ``client`` (1 and 1 without), and ``cleanup.policy=compact``
    for the compacted topics."""
    settings = client if client is not None else KafkaClientSettings()
    configs = {"min.insync.replicas": str(settings.topic_min_insync_replicas)}
    if name in names.compacted():
        configs["cleanup.policy"] = "compact"
    return {"num_partitions": partitions, "replication_factor": settings.topic_replication_factor, "configs": configs}


def ensure_topics(
    bootstrap_servers: str, names: TopicNames, partitions: int, client: KafkaClientSettings | None = None
) -> list[str]:
    """Create the topics that do not exist yet (:func:`topic_options`: replicated as ``client`` says, the compacted
    ones with ``cleanup.policy=compact``), connecting with ``client``'s security; returns the names created.
    Existing topics are left as they are."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    security = client.kafka_security if client is not None else None
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers, client_id="perfusion-topics", **kafka_python_kwargs(security)
        )
    except KafkaError as exc:
        raise InfrastructureError(
            f"cannot reach Kafka at {bootstrap_servers!r} ({exc}); start it with `perfusion broker up` "
            "or set KAFKA_BOOTSTRAP_SERVERS"
        ) from exc
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names.all() if name not in existing]
        created: list[str] = []
        for name in missing:
            try:
                admin.create_topics({name: topic_options(names, name, partitions, client)}, wait_for_metadata=True)
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
        if created:
            log.info("created topics %s with %d partitions", ", ".join(created), partitions)
        return created
    finally:
        admin.close()
