"""The Faust topic objects of the worker's app, one per name in :class:`perfusion.contracts.topics.TopicNames`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from perfusion.contracts.topics import TopicNames
from streams.settings import StreamSettings

if TYPE_CHECKING:
    import faust
    from faust.types import TopicT


@dataclass(frozen=True)
class Topics:
    """The Faust topic objects of one app. Values and keys are raw bytes: records are (de)serialized by
    ``perfusion.contracts.records`` so that an invalid message can reach the dead-letter topic with its original
    bytes."""

    names: TopicNames
    events: TopicT
    dead_letters: TopicT
    group_samples: TopicT
    group_drops: TopicT
    production_orders: TopicT
    train_requests: TopicT
    model_updates: TopicT
    design_demand: TopicT  # compacted: each design's latest demand state (created so by ``ensure_topics``)


def declare_topics(app: faust.App, settings: StreamSettings) -> Topics:
    """Declare every topic on ``app``; every one has ``settings.partitions`` partitions so tables co-partition."""
    names = TopicNames.for_prefix(settings.topic_prefix)

    def topic(name: str) -> TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )

    return Topics(
        names=names,
        events=topic(names.events),
        dead_letters=topic(names.dead_letters),
        group_samples=topic(names.group_samples),
        group_drops=topic(names.group_drops),
        production_orders=topic(names.production_orders),
        train_requests=topic(names.train_requests),
        model_updates=topic(names.model_updates),
        design_demand=topic(names.design_demand),
    )
