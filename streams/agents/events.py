"""The events agent: the one Faust agent that reads ``perfusion.events``, parses each message once, and runs the
stages that fold inbound events into state.

Every inbound event feeds three computations: preference features (:mod:`streams.agents.preferences`), group
samples (:mod:`streams.agents.groups`) and the routing of demand events by design (:mod:`streams.agents.demand`).
Three agents on the same topic would triple Faust's per-message work (delivery to each agent's stream, buffering,
acknowledgement) and the parsing. So one agent takes a micro-batch, admits each message through the dead-letter
gate (invalid ones go to ``perfusion.dlq`` with their reason and bytes), and hands the admitted events to each
stage in turn. Before any of that, the batch's offsets are checked for a gap (:mod:`streams.continuity`): records
the consumer skipped make the worker restart instead of being lost.

The error policy, one for every stage. A stage first *folds* the batch into state it can still take back, then
*commits*: table writes, outputs acknowledged by the broker, changelog flushed, Feast push (the stages' commits run
concurrently: their effects are independent). If folding raises, no one event can be blamed yet: every stage
*discards* what it folded, and the batch is folded again one event at a time, each committed on its own; an event
that raises again is discarded from every stage and dead-lettered with the stage's exception as its reason, and the
rest go on. So every event of a batch ends in state or in the dead-letter topic, and only then is the batch
acknowledged. Committing raises only for what is not about the events (the broker, Feast): those effects are retried
until they succeed (:mod:`streams.liveness`), and anything else that escapes ends the worker rather than let Faust
skip the batch.

The batch's last effect may run on while the next batch is folded. The preference stage's Feast push takes most of
a live batch's time (the writer process turns each row into protobuf values and one SQLite upsert per feature), and
nothing of the next batch depends on it, so a stage's commit may hand back a *tail*: what is left of its effects, in
order behind the tail of the batch before. A batch's messages are acknowledged only once its tails are done too:
each message is held (one more reference to it, so that Faust's acknowledgement when the agent asks for the next
batch is not the last) and released by the agent after the tails. At most one batch's tail runs while the next batch
is folded.

An event whose Kafka key is not its ``user_id`` (no key, or a wrong one) would put a user's events on two
partitions; it is not folded but sent again to ``perfusion.events`` under the right key, and folded when it comes
round on its user's partition.

A stage module exposes ``stage(context) -> EventStage``; :data:`EVENT_STAGE_MODULES` lists them in the order they
run.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from perfusion.contracts.records import AnyEvent
from streams.continuity import OffsetContinuity
from streams.dead_letters import EventGate, MessageHeaders, MessagePosition, dead_letter, failure_reason
from streams.liveness import fail_worker_on_crash
from streams.table_store import forget_on_rebalance, send_and_wait

if TYPE_CHECKING:
    import faust
    from faust.streams import Stream
    from faust.types import AgentT, EventT, StreamT, TopicT

    from streams.context import AgentContext

log = logging.getLogger(__name__)

LAG_REFRESH_S = 2.0  # seconds between measurements of perfusion_worker_consumer_lag

EVENT_STAGE_MODULES: tuple[str, ...] = (
    "streams.agents.preferences",
    "streams.agents.groups",
    "streams.agents.demand",
)


@dataclass(frozen=True, slots=True)
class AdmittedEvent:
    """A valid inbound event with where it was read and its original bytes."""

    event: AnyEvent
    raw: bytes
    partition: int


class EventStage(Protocol):
    """One computation over the inbound events of a micro-batch, in two steps: fold, then commit."""

    async def fold(self, batch: Sequence[AdmittedEvent]) -> None:
        """Fold ``batch`` (in partition order as read) into state that :meth:`discard` can still take back; no
        effect outside this process."""

    async def commit(self) -> Awaitable[None] | None:
        """Finish every effect of what was folded since the last commit, or all but a tail: an awaitable that
        finishes the rest, in order behind the previous commit's tail (the batch is acknowledged after it)."""

    def discard(self) -> None:
        """Take back everything folded since the last commit, as if it had never been folded."""


@dataclass(frozen=True, slots=True)
class ReadMessage:
    """One message of a micro-batch as the agent read it."""

    value: bytes | None
    key: bytes | None
    headers: MessageHeaders
    position: MessagePosition


class EventsAgent:
    """The body of the events agent, apart from Faust's stream so that it can be driven in process."""

    def __init__(self, context: AgentContext, stages: Sequence[tuple[str, EventStage]]) -> None:
        self._context = context
        self._stages = stages
        self._gate = EventGate(sink=context.dead_letter_sink)
        self.counts: Counter[str] = Counter()

    async def process(self, messages: Sequence[ReadMessage]) -> None:
        """Admit, fold and commit one micro-batch; returns once every message ended in state or in the DLQ."""
        tail = await self.begin(messages)
        if tail is not None:
            await tail

    async def begin(self, messages: Sequence[ReadMessage]) -> Awaitable[None] | None:
        """:meth:`process` but for the tail of the stages' effects, returned (None when there is none): every
        message has ended in state or in the DLQ once it is done."""
        admitted: list[tuple[AdmittedEvent, ReadMessage]] = []
        rekeyed: list[tuple[TopicT, bytes, bytes]] = []
        for message in messages:
            event = await self._gate.admit(message.value, message.position, message.key, message.headers)
            if event is None:
                self._count("dead_letter")
                continue
            assert message.value is not None  # a tombstone is never an event
            if message.key != event.user_id.encode():
                log.warning(
                    "event %s at %s has key %r, not its user_id %r: sent again under its user_id",
                    event.event_id, message.position, message.key, event.user_id,
                )  # fmt: skip
                rekeyed.append((self._context.topics.events, event.user_id.encode(), message.value))
                self._count("rekeyed")
                continue
            admitted.append((AdmittedEvent(event, message.value, message.position.partition), message))
        await send_and_wait(rekeyed)
        async with self._context.event_state_lock:
            try:
                await self._fold([event for event, _ in admitted])
            except Exception as exc:
                log.warning(
                    "a batch of %d events could not be folded (%s: %s); folding them one at a time",
                    len(admitted), type(exc).__name__, exc,
                )  # fmt: skip
                self._discard()
                await self._one_at_a_time(admitted)
                return None
            tail = await self._commit()
        self._count("folded", len(admitted))
        return tail

    async def _fold(self, batch: Sequence[AdmittedEvent]) -> None:
        for _, event_stage in self._stages:
            await event_stage.fold(batch)

    async def _commit(self) -> Awaitable[None] | None:
        # The stages' effects are independent of one another (their own tables, topics and Feast rows), so they are
        # finished at once: one wait for the broker's acknowledgements and the Feast push, not one per stage.
        results = await asyncio.gather(*(event_stage.commit() for _, event_stage in self._stages))
        tails = [tail for tail in results if tail is not None]
        if not tails:
            return None
        return tails[0] if len(tails) == 1 else asyncio.ensure_future(_all_of(tails))

    def _discard(self) -> None:
        for _, event_stage in self._stages:
            event_stage.discard()

    async def _one_at_a_time(self, admitted: Sequence[tuple[AdmittedEvent, ReadMessage]]) -> None:
        for event, message in admitted:
            try:
                for name, event_stage in self._stages:
                    failing_stage = name
                    await event_stage.fold([event])
            except Exception as exc:
                self._discard()
                reason = failure_reason(failing_stage, exc)
                log.error("dead-lettering event %s at %s: %s", event.event.event_id, message.position, reason)
                letter = dead_letter(message.value, reason, message.position, key=message.key, headers=message.headers)
                await self._context.dead_letter_sink(message.position.dead_letter_key(), letter)
                self._count("dead_letter")
                continue
            tail = await self._commit()
            if tail is not None:  # one event at a time is the rare path: each one finished before the next
                await tail
            self._count("folded")

    def _count(self, outcome: str, events: int = 1) -> None:
        self.counts[outcome] += events
        self._context.metrics.events.labels(outcome=outcome).inc(events)


async def _all_of(tails: Sequence[Awaitable[None]]) -> None:
    await asyncio.gather(*tails)


def register(context: AgentContext) -> AgentT:
    """Declare the events agent, running the stages of ``context.event_stage_modules`` in order."""
    app, settings, topics = context.app, context.settings, context.topics
    stages = [
        (name.rsplit(".", 1)[-1], importlib.import_module(name).stage(context)) for name in context.event_stage_modules
    ]
    agent = EventsAgent(context, stages)
    continuity = OffsetContinuity.for_app(app)
    # partition -> the offset after the last message the agent finished there, since the partition was assigned
    finished_offsets: dict[int, int] = {}
    forget_on_rebalance(app, finished_offsets)

    async def finish(batch: Sequence[EventT], tail: Awaitable[None] | None) -> None:
        """Wait for the batch's tail, then release its messages: only now may their offsets be committed."""
        if tail is not None:
            await tail
        stamps = [event.message.timestamp for event in batch if event.message.timestamp]
        context.metrics.observe_batch(len(batch), min(stamps, default=None), time.time())
        for event in batch:
            event.message.ack(app.consumer)  # the reference held in events(); Faust's own is released by then
            partition, offset = event.message.partition, event.message.offset
            finished_offsets[partition] = max(finished_offsets.get(partition, 0), offset + 1)

    def crash_on_failure(finished: asyncio.Future[None]) -> None:
        if not finished.cancelled() and finished.exception() is not None:
            context.on_crash("the events agent", cast(BaseException, finished.exception()))

    async def events(stream: StreamT[bytes]) -> None:
        finishing: asyncio.Future[None] | None = None  # the previous batch's finish(), at most one in flight
        try:
            async for batch in cast("Stream[bytes]", stream).take_events(
                settings.push_batch_max, within=settings.push_batch_within_s
            ):
                continuity.check(batch, context.on_skipped_records)
                for event in batch:
                    # One more reference: Faust's acknowledgement, when this loop asks for the next batch, is then not
                    # the last one, and the offset is not committed before finish() releases it.
                    event.message.incref()
                tail = await agent.begin([read_message(event) for event in batch])
                if finishing is not None:
                    await finishing
                finishing = asyncio.ensure_future(finish(batch, tail))
                finishing.add_done_callback(crash_on_failure)  # a tail that fails while no batch comes in
        finally:
            if finishing is not None and not finishing.done():
                finishing.cancel()  # its messages stay unacknowledged: read again by the partition's next owner

    async def refresh_consumer_lag() -> None:
        try:
            context.metrics.set_consumer_lag(await events_lag(app, topics.events.get_topic_name(), finished_offsets))
        except Exception as exc:  # the metric goes stale; processing goes on
            log.warning("could not measure the consumer lag of %s (%s: %s)", topics.events, type(exc).__name__, exc)

    app.timer(interval=LAG_REFRESH_S)(refresh_consumer_lag)
    return app.agent(topics.events, name="events")(fail_worker_on_crash("the events agent", events, context.on_crash))


async def events_lag(app: faust.App, topic: str, finished_offsets: Mapping[int, int]) -> list[tuple[str, int, int]]:
    """``(topic, partition, lag)`` of every partition of ``topic`` this worker owns whose end the consumer knows:
    the broker's end offset less the offset after the last message finished there, or, before the first batch
    since the partition was assigned, less the consumer's fetch position (the messages fetched and not yet finished
    are then left out)."""
    consumer = app.consumer
    lags = []
    for tp in sorted(tp for tp in consumer.assignment() if tp.topic == topic):
        highwater = consumer.highwater(tp)
        if highwater is None:  # nothing fetched from the partition yet
            continue
        finished = finished_offsets.get(tp.partition)
        if finished is None:
            finished = await consumer.position(tp)
            if finished is None:
                continue
        lags.append((tp.topic, tp.partition, max(0, highwater - finished)))
    return lags


def read_message(event: EventT) -> ReadMessage:
    message = event.message
    return ReadMessage(
        value=event.value,
        key=message.key,
        headers=message.headers,
        position=MessagePosition(message.topic, message.partition, message.offset),
    )
