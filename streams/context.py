"""What every agent module's ``register`` and every event stage module's ``stage`` gets: :class:`AgentContext`.

It lives apart from the app (:mod:`streams.app`) so that the agents import this module and the app imports the
agents, never the other way round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from streams.continuity import SkippedRecords, restart_worker_process
from streams.dead_letters import DeadLetterSink
from streams.liveness import CrashHandler, exit_worker_process
from streams.metrics import WorkerMetrics
from streams.settings import StreamSettings

if TYPE_CHECKING:
    import faust

    from streams.topics import Topics

FeatureSink = Callable[[list[dict[str, Any]]], Awaitable[None]]
"""Pushes a micro-batch of ``user_preferences`` rows (entity key, features, ``event_timestamp``)."""


@dataclass(frozen=True)
class AgentContext:
    """What an agent module's ``register`` (and an event stage module's ``stage``) gets: the app, its topics,
    settings, the two effect sinks, the stage modules the events agent runs, what to do when the consumer skipped
    records (:mod:`streams.continuity`: restart the process) and when an agent or a timer crashed
    (:mod:`streams.liveness`: end the process). ``event_state_lock`` is held by the events agent from folding a
    batch to committing it, and by the timers that change the same stages' state. ``metrics`` are the worker's
    Prometheus metrics (:mod:`streams.metrics`), counted where each thing happens."""

    app: faust.App
    topics: Topics
    settings: StreamSettings
    dead_letter_sink: DeadLetterSink
    feature_sink: FeatureSink
    event_stage_modules: tuple[str, ...]
    on_skipped_records: Callable[[SkippedRecords], NoReturn] = restart_worker_process
    on_crash: CrashHandler = exit_worker_process
    event_state_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
