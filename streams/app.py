"""The Faust app of the stream worker: one app, every agent in ``streams.agents.AGENT_MODULES``.

:func:`create_app` builds the app from :class:`~streams.settings.StreamSettings`, declares the topics, and calls
each agent module's ``register(context)`` with an :class:`AgentContext`. Tables use Faust's in-memory store backed
by changelog topics, so a restarted worker rebuilds its state from Kafka. The app connects with the settings'
``kafka_security`` (Faust's ``broker_credentials``), and every topic it creates itself (changelogs, repartition
topics, the leader topic) gets the settings' replication factor and ``min.insync.replicas``, as the loop's own topics
do (:func:`~perfusion.contracts.topics.ensure_topics`). Faust's ``processing_guarantee`` stays
at-least-once (its exactly-once mode has open bugs); agents make their effects idempotent by deduplicating on
``event_id`` and writing downstream records under deterministic keys.

Faust is imported here at module level: import this module only inside a command handler or a test.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import AgentT

from perfusion.contracts.records import DeadLetter
from perfusion.contracts.topics import ensure_topics
from perfusion.kafka_security import faust_credentials
from streams.agents import AGENT_MODULES
from streams.agents.events import EVENT_STAGE_MODULES
from streams.context import AgentContext, FeatureSink
from streams.direct_topic import DirectTopic
from streams.feast_sink import FeastSink
from streams.liveness import CrashHandler, exit_worker_process
from streams.metrics import WorkerMetrics
from streams.settings import StreamSettings
from streams.table_store import send_and_wait
from streams.topics import Topics, declare_topics

log = logging.getLogger(__name__)


class LoopApp(faust.App):
    """A Faust app whose internal topics (the ones Faust creates: changelogs, repartition and leader topics) are
    created with :attr:`internal_topic_configs` besides their own configs (``min.insync.replicas``)."""

    internal_topic_configs: Mapping[str, str] = {}

    def topic(
        self, *topics: str, internal: bool = False, config: Mapping[str, Any] | None = None, **options: Any
    ) -> Any:
        if internal:
            config = {**self.internal_topic_configs, **(config or {})}
        return super().topic(*topics, internal=internal, config=config, **options)


@dataclass(frozen=True)
class StreamApp:
    """A built app with the agents each module registered, by module path."""

    app: faust.App
    topics: Topics
    settings: StreamSettings
    agents: dict[str, AgentT]
    feature_sink: FeatureSink
    metrics: WorkerMetrics

    def ensure_topics(self) -> list[str]:
        """Create the loop's topics on the broker (before anything produces)."""
        return ensure_topics(
            self.settings.resolved_bootstrap_servers(),
            self.topics.names,
            self.settings.partitions,
            client=self.settings,
        )


def create_app(
    settings: StreamSettings,
    feature_sink: FeatureSink | None = None,
    agent_modules: tuple[str, ...] = AGENT_MODULES,
    event_stage_modules: tuple[str, ...] = EVENT_STAGE_MODULES,
    on_crash: CrashHandler = exit_worker_process,
) -> StreamApp:
    """Build the worker's Faust app. ``feature_sink`` defaults to a Feast pusher opened on first use; tests may
    run fewer agents or event stages, and handle a crashed agent otherwise than by ending the process."""
    data_dir = settings.resolved_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    seek_uncommitted_partitions_to_beginning()
    app = LoopApp(
        settings.group_id,
        broker=f"kafka://{settings.resolved_bootstrap_servers()}",
        broker_credentials=faust_credentials(settings.kafka_security),
        store="memory://",
        Topic=DirectTopic,  # raw sends skip Faust's per-record machinery (streams.direct_topic)
        datadir=str(data_dir),
        autodiscover=False,
        web_enabled=settings.http_port > 0,
        web_port=settings.http_port or None,
        web_bind=settings.http_host,
        web_host=settings.http_host,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.topic_replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        # The broker expects a few heartbeats per session; Faust's default (3 s) suits the default 60 s session.
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 4),
    )
    app.internal_topic_configs = {"min.insync.replicas": str(settings.topic_min_insync_replicas)}
    topics = declare_topics(app, settings)
    metrics = WorkerMetrics()
    if settings.http_port > 0:
        from streams.web import register_pages

        register_pages(app, metrics)

    async def send_dead_letter(key: bytes, letter: DeadLetter) -> None:
        # Acknowledged by the broker before the batch that held the message can be acknowledged.
        await send_and_wait([(topics.dead_letters, key, letter.to_bytes())])
        metrics.count_dead_letter(letter.topic, letter.reason)

    context = AgentContext(
        app=app,
        topics=topics,
        settings=settings,
        dead_letter_sink=send_dead_letter,
        feature_sink=feature_sink if feature_sink is not None else FeastSink(metrics, writer=settings.feast_writer),
        event_stage_modules=event_stage_modules,
        on_crash=on_crash,
        metrics=metrics,
    )
    agents = {name: importlib.import_module(name).register(context) for name in agent_modules}
    return StreamApp(
        app=app,
        topics=topics,
        settings=settings,
        agents=agents,
        feature_sink=context.feature_sink,
        metrics=metrics,
    )


def seek_uncommitted_partitions_to_beginning() -> None:
    """Make Faust start a partition that has no committed offset at its beginning, as ``auto_offset_reset=earliest``
    says, even when this consumer owned the partition before.

    After a rebalance Faust's recovery calls aiokafka's ``seek_to_committed``, which seeks only partitions whose
    committed offset is above 0. A worker that owned a partition in the previous generation keeps its fetch
    position there, and records fetched while recovery had the flow stopped are dropped by Faust: with no
    committed offset to seek back to, they were never processed (two workers, the second one joining while events
    arrive: the first events of the first worker's new partitions were lost). This wrapper seeks such partitions to
    the committed offset 0 or, with none, to the beginning. Applied once per process; idempotent.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread.seek_to_committed, "_seeks_uncommitted", False):
        return
    seek_to_committed = AIOKafkaConsumerThread.seek_to_committed

    async def seek_to_committed_or_beginning(self: AIOKafkaConsumerThread) -> Any:
        committed = await seek_to_committed(self)
        consumer = self._ensure_consumer()

        async def seek_the_rest() -> None:  # runs on the consumer's thread, like every call to the consumer
            for tp, offset in committed.items():
                if offset == 0:
                    consumer.seek(tp, 0)
            never_committed = [tp for tp, offset in committed.items() if offset is None or offset < 0]
            if never_committed:
                await consumer.seek_to_beginning(*never_committed)

        await self.call_thread(seek_the_rest)
        return committed

    seek_to_committed_or_beginning._seeks_uncommitted = True  # type: ignore[attr-defined]
    AIOKafkaConsumerThread.seek_to_committed = seek_to_committed_or_beginning  # type: ignore[method-assign]


def run_worker(stream_app: StreamApp, loglevel: str = "info") -> None:
    """Run the worker in this process until a signal stops it."""
    from faust.worker import Worker

    stream_app.ensure_topics()
    if isinstance(stream_app.feature_sink, FeastSink):
        writer_pid = stream_app.feature_sink.open()
        log.info("Feast store open; pushes run in %s (pid %d)", stream_app.feature_sink.writer, writer_pid)
    log.info(
        "worker %s on %s: agents %s",
        stream_app.settings.group_id,
        stream_app.settings.resolved_bootstrap_servers(),
        ", ".join(stream_app.agents),
    )
    settings = stream_app.settings
    if settings.http_port > 0:
        log.info(
            "health, readiness and metrics on http://%s:%d (/healthz, /readyz, /metrics)",
            settings.http_host,
            settings.http_port,
        )
    logging_config = None
    if settings.json_logs:
        from streams.logs import json_logging_config

        logging_config = json_logging_config(loglevel)
    worker = Worker(stream_app.app, loglevel=loglevel, quiet=True, logging_config=logging_config)
    # Faust's progress spinner sets the root logger to DEBUG, so every debug call of aiokafka and Faust (several per
    # message) built a log record only to drop it: about a tenth of the worker's time. No spinner, no DEBUG.
    worker.spinner = None
    worker.execute_from_commandline()
