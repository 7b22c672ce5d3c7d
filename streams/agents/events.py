"""The events agent: the one Faust agent that reads ``perfusion.events``, parses each message once, and runs the
stages that fold inbound events into state.

Every inbound event feeds three computations: preference features (:mod:`streams.agents.preferences`), group
samples (:mod:`streams.agents.groups`) and the routing of demand events by design (:mod:`streams.agents.demand`).
Three agents on the same topic would triple Faust's per-message work (delivery to each agent's stream, buffering,
acknowledgement) and the parsing. So one agent takes a micro-batch, admits each message through the dead-letter
gate (invalid ones go to ``perfusion.dlq`` with their reason and bytes), and hands the admitted events to each
stage in turn. A stage finishes its effects (table writes, outputs acknowledged by the broker, changelog flushed,
Feast push) before it returns; the batch's offsets are acknowledged only after every stage returned, so a crash
replays the batch into at least the state it had. Before any of that, the batch's offsets are checked for a gap
(:mod:`streams.continuity`): records the consumer skipped make the worker restart instead of being lost.

A stage module exposes ``stage(context) -> EventStage``; :data:`EVENT_STAGE_MODULES` lists them in the order they
run.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from perfusion.contracts.records import AnyEvent
from streams.continuity import OffsetContinuity
from streams.dead_letters import EventGate, MessagePosition

if TYPE_CHECKING:
    from faust.streams import Stream
    from faust.types import AgentT, StreamT

    from streams.context import AgentContext

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
    """One computation over the inbound events of a micro-batch."""

    async def process(self, batch: Sequence[AdmittedEvent]) -> None:
        """Fold ``batch`` (in partition order as read) into state and finish every effect before returning."""


def register(context: AgentContext) -> AgentT:
    """Declare the events agent, running the stages of ``context.event_stage_modules`` in order."""
    app, settings, topics = context.app, context.settings, context.topics
    stages: list[EventStage] = [importlib.import_module(name).stage(context) for name in context.event_stage_modules]
    gate = EventGate(sink=context.dead_letter_sink)
    continuity = OffsetContinuity.for_app(app)

    async def events(stream: StreamT[bytes]) -> None:
        async for batch in cast("Stream[bytes]", stream).take_events(
            settings.push_batch_max, within=settings.push_batch_within_s
        ):
            continuity.check(batch, context.on_skipped_records)
            admitted: list[AdmittedEvent] = []
            for event in batch:
                message = event.message
                position = MessagePosition(message.topic, message.partition, message.offset)
                parsed = await gate.admit(event.value, position)
                if parsed is not None:
                    admitted.append(AdmittedEvent(parsed, event.value, message.partition))
            for event_stage in stages:
                await event_stage.process(admitted)

    return app.agent(topics.events, name="events")(events)
