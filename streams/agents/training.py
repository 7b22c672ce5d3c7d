"""The training trigger's agents (the logic is :mod:`streams.training_trigger`).

``train-trigger-route`` validates each record of ``perfusion.group-samples`` (keyed by sample_id;
anything that is not a group sample goes to the dead-letter topic) and forwards only ``(sample_id, model_version)``
to the internal topic ``<app id>-train-trigger-by-version``, keyed by model_version, so that one partition owns
each version; ``train-trigger`` counts them in micro-batches, logging its state to the changelog once per batch.
A timer ticks every active partition of that topic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from pydantic import ValidationError

from perfusion.contracts.records import GroupSample, TrainRequest, validation_reason
from streams.continuity import OffsetContinuity
from streams.dead_letters import MessagePosition, dead_letter, failure_reason
from streams.liveness import fail_worker_on_crash
from streams.table_store import (
    JsonTableStore,
    flush_changelogs,
    forget_on_rebalance,
    internal_topic,
    raw_table,
    send_and_wait,
)
from streams.training_trigger import (
    BY_VERSION_SUFFIX,
    TABLE_NAME,
    TrainingTrigger,
    read_routed_sample,
    routed_sample,
)

if TYPE_CHECKING:
    from faust.streams import Stream
    from faust.types import AgentT, StreamT, TopicT

    from streams.context import AgentContext

log = logging.getLogger(__name__)


def by_version_topic_name(group_id: str) -> str:
    return group_id + BY_VERSION_SUFFIX


BATCH_MAX = 1000
BATCH_WITHIN_S = 0.1


def register(context: AgentContext) -> AgentT:
    """Declare the training trigger's route and counting agents, its table, internal topic and timer on
    ``context.app``; returns the counting agent."""
    app, settings, topics = context.app, context.settings, context.topics
    trigger_settings = settings.train
    by_version = internal_topic(app, by_version_topic_name(settings.group_id), settings.partitions)
    table = raw_table(app, TABLE_NAME, settings.partitions)
    triggers: dict[int, tuple[TrainingTrigger, JsonTableStore]] = {}
    forget_on_rebalance(app, triggers)

    def trigger_for(partition: int) -> tuple[TrainingTrigger, JsonTableStore]:
        if partition not in triggers:
            store = JsonTableStore(table, partition)
            triggers[partition] = (TrainingTrigger(trigger_settings, store, partition), store)
        return triggers[partition]

    async def deliver(
        emitted: list[tuple[TrainingTrigger, list[TrainRequest]]], stores: Iterable[JsonTableStore]
    ) -> None:
        """Send the requests, wait for the broker, confirm them; then log the changed keys to the changelog."""
        await send_and_wait(
            [(topics.train_requests, r.request_id.encode(), r.to_bytes()) for _, requests in emitted for r in requests]
        )
        for trigger, requests in emitted:
            trigger.confirm(requests)
            for request in requests:
                log.info("train request %s (%s, %d samples)", request.request_id, request.reason, request.new_samples)
                context.metrics.train_requests.labels(reason=request.reason).inc()
        await flush_changelogs(stores)

    samples_continuity = OffsetContinuity.for_app(app)

    async def route(stream: StreamT[bytes]) -> None:
        """Validate each group sample (dead-letter what is not one) and forward (sample_id, model_version) keyed by
        model version, so that one partition counts each version."""
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            samples_continuity.check(batch, context.on_skipped_records)
            forwards: list[tuple[TopicT, bytes, bytes]] = []
            for event in batch:
                message = event.message
                try:
                    sample = GroupSample.model_validate_json(event.value or b"")
                    reason = None
                except ValidationError as exc:
                    reason = "not a group sample: " + validation_reason(exc, whole="record")
                except Exception as exc:  # anything else about this one record: it is dead-lettered the same way
                    reason = failure_reason("the training route", exc)
                if reason is not None:
                    position = MessagePosition(message.topic, message.partition, message.offset)
                    log.warning("dead-lettering an unreadable group sample at %s: %s", position, reason)
                    letter = dead_letter(event.value, reason, position, key=message.key, headers=message.headers)
                    await context.dead_letter_sink(position.dead_letter_key(), letter)
                    continue
                forwards.append((by_version, sample.model_version.encode(), routed_sample(sample)))
            if forwards:
                await send_and_wait(forwards)

    by_version_continuity = OffsetContinuity.for_app(app)

    async def count(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            by_version_continuity.check(batch, context.on_skipped_records)
            emitted: list[tuple[TrainingTrigger, list[TrainRequest]]] = []
            touched: dict[int, JsonTableStore] = {}  # held here: a rebalance may clear ``triggers`` meanwhile
            for event in batch:
                partition = event.message.partition
                trigger, store = trigger_for(partition)
                touched[partition] = store
                store.checkpoint()
                try:
                    sample_id, model_version = read_routed_sample(event.value)
                    requests = trigger.on_sample(sample_id, model_version)
                except Exception as exc:
                    store.rollback()
                    triggers.pop(partition, None)  # its in-memory index may hold what was rolled back
                    message = event.message
                    position = MessagePosition(message.topic, message.partition, message.offset)
                    reason = failure_reason("the training trigger", exc)
                    log.error("dead-lettering the message at %s: %s", position, reason)
                    letter = dead_letter(event.value, reason, position, key=message.key, headers=message.headers)
                    await context.dead_letter_sink(position.dead_letter_key(), letter)
                    continue
                if requests:
                    emitted.append((trigger, requests))
            await deliver(emitted, touched.values())

    async def tick() -> None:
        active = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == by_version.get_topic_name()}
        for partition in sorted(active):
            trigger, store = trigger_for(partition)
            requests = trigger.on_tick()
            await deliver([(trigger, requests)] if requests else [], [store])

    app.timer(interval=trigger_settings.tick_s)(
        fail_worker_on_crash("the training trigger's timer", tick, context.on_crash)
    )
    app.agent(topics.group_samples, name="train-trigger-route")(
        fail_worker_on_crash("the training route", route, context.on_crash)
    )
    return app.agent(by_version, name="train-trigger")(
        fail_worker_on_crash("the training trigger", count, context.on_crash)
    )
