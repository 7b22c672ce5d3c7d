"""The one place that decides what happens to an inbound message that is not a valid event.

The events agent (:mod:`streams.agents.events`) passes each message of ``perfusion.events`` through a *writing*
:class:`EventGate`, which sends each invalid message to the dead-letter topic as a
:class:`~perfusion.contracts.records.DeadLetter` with the reason and the original bytes. A *counting* gate (no sink),
used for the internal demand topic whose messages were admitted once already, skips and counts them. Either way the
worker keeps running and logs ``topic[partition]@offset``.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from perfusion.contracts.records import AnyEvent, DeadLetter, InvalidEvent, parse_event

log = logging.getLogger(__name__)

DeadLetterSink = Callable[[bytes, DeadLetter], Awaitable[object]]
"""Sends one dead letter: ``(key, record)``. The app binds it to the dead-letter topic."""


@dataclass(frozen=True)
class MessagePosition:
    """Where a message was read: enough to find it again."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def dead_letter_key(self) -> bytes:
        """Deterministic, so a replayed invalid message overwrites its dead letter under log compaction."""
        return str(self).encode()


def dead_letter(raw: bytes | None, reason: str, position: MessagePosition, now: float | None = None) -> DeadLetter:
    """The dead letter of one unusable message; ``raw`` None (a tombstone) is kept as empty bytes."""
    return DeadLetter(
        reason=reason,
        original_b64=base64.b64encode(raw or b"").decode("ascii"),
        topic=position.topic,
        partition=position.partition,
        offset=position.offset,
        ts=time.time() if now is None else now,
    )


def original_bytes(letter: DeadLetter) -> bytes:
    return base64.b64decode(letter.original_b64)


ParseResult = AnyEvent | InvalidEvent
"""What parsing one message gave: the event, or why it is not one."""


class EventGate:
    """Validates raw inbound messages; invalid ones are dead-lettered through ``sink``, or only counted when
    ``sink`` is None."""

    def __init__(self, sink: DeadLetterSink | None, clock: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._clock = clock
        self.invalid_by_reason: Counter[str] = Counter()

    @property
    def writes_dead_letters(self) -> bool:
        return self._sink is not None

    @property
    def invalid_count(self) -> int:
        return sum(self.invalid_by_reason.values())

    async def admit(self, raw: bytes | None, position: MessagePosition) -> AnyEvent | None:
        """The validated event, or None after the invalid message has been dead-lettered or counted."""
        now = self._clock()
        if raw is None:
            result: ParseResult = InvalidEvent("empty message (tombstone); an event must be a JSON object")
        else:
            result = _parse(raw, now)
        if not isinstance(result, InvalidEvent):
            return result
        reason = result.reason
        self.invalid_by_reason[_reason_kind(reason)] += 1
        if self._sink is None:
            log.debug("skipping invalid event at %s: %s", position, reason)
            return None
        log.warning("dead-lettering invalid event at %s: %s", position, reason)
        await self._sink(position.dead_letter_key(), dead_letter(raw, reason, position, now=now))
        return None


def _parse(raw: bytes, now: float) -> ParseResult:
    try:
        return parse_event(raw, now=now)
    except InvalidEvent as exc:
        return exc


def _reason_kind(reason: str) -> str:
    """A short bucket for counting: the text before the first colon, or the first three words."""
    head = reason.split(":", 1)[0]
    return head if len(head) <= 40 else " ".join(reason.split()[:3])
