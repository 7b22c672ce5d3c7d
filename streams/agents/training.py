"""The training trigger's agent (the logic is :mod:`streams.training_trigger`).

The group builder's stage (:mod:`streams.agents.groups`) sends ``(sample_id, model_version)`` of every sample it
delivers to the internal topic ``<app id>-train-trigger-by-version`` (:func:`by_version_topic`), keyed by
model_version so that one partition owns each version, in the same acknowledged send as the sample itself: a sample
the broker took is counted, and a repeated one is counted once. ``train-trigger`` counts them in micro-batches,
logging its state to the changelog once per batch; a record it cannot read goes to the dead-letter topic. A timer
ticks every active partition of that topic.

The worker does not read ``perfusion.group-samples`` back. It did, once: an agent that validated every sample (a few
kilobytes of JSON, K candidates with their descriptors) only to forward its two fields cost more CPU per sample
than building it, for a topic only this worker writes; the trainer reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from perfusion.contracts.records import TrainRequest
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
from streams.training_trigger import TABLE_NAME, TrainingTrigger, by_version_topic_name, read_routed_sample

if TYPE_CHECKING:
    from faust.streams import Stream
    from faust.types import AgentT, StreamT, TopicT

    from streams.context import AgentContext

log = logging.getLogger(__name__)

BATCH_MAX = 1000
BATCH_WITHIN_S = 0.1


def by_version_topic(context: AgentContext) -> TopicT:
    """The app's topic of ``(sample_id, model_version)`` records, one object for the stage that writes it and the
    agent that reads it."""
    return internal_topic(context.app, by_version_topic_name(context.settings.group_id), context.settings.partitions)


def register(context: AgentContext) -> AgentT:
    """Declare the training trigger's counting agent, its table, internal topic and timer on ``context.app``;
    returns the agent."""
    app, topics = context.app, context.topics
    trigger_settings = context.settings.train
    by_version = by_version_topic(context)
    table = raw_table(app, TABLE_NAME, context.settings.partitions)
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
    return app.agent(by_version, name="train-trigger")(
        fail_worker_on_crash("the training trigger", count, context.on_crash)
    )
