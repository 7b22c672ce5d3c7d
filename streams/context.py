"""What every agent module's ``register`` and every event stage module's ``stage`` gets: :class:`AgentContext`.

It lives apart from the app (:mod:`streams.app`) so that the agents import this module and the app imports the
agents, never the other way round.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from streams.continuity import SkippedRecords, restart_worker_process
from streams.dead_letters import DeadLetterSink
from streams.settings import StreamSettings

if TYPE_CHECKING:
    import faust

    from streams.topics import Topics

FeatureSink = Callable[[list[dict[str, Any]]], Awaitable[None]]
"""Pushes a micro-batch of ``user_preferences`` rows (entity key, features, ``event_timestamp``)."""


@dataclass(frozen=True)
class AgentContext:
    """What an agent module's ``register`` (and an event stage module's ``stage``) gets: the app, its topics,
    settings, the two effect sinks, the stage modules the events agent runs, and what to do when the consumer skipped
    records (:mod:`streams.continuity`: restart the process)."""

    app: faust.App
    topics: Topics
    settings: StreamSettings
    dead_letter_sink: DeadLetterSink
    feature_sink: FeatureSink
    event_stage_modules: tuple[str, ...]
    on_skipped_records: Callable[[SkippedRecords], NoReturn] = restart_worker_process
