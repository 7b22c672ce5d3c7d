"""The one place that decides what happens to an inbound message that is not a valid event.

Every agent that reads ``perfusion.events`` passes each message through an :class:`EventGate`. Exactly one agent
(the preference agent) owns a *writing* gate, which sends each invalid message to the dead-letter topic as a
:class:`~streams.records.DeadLetter` with the reason and the original bytes; every other agent uses a *counting*
gate, which skips and counts the same messages without dead-lettering them a second time. Either way the worker
keeps running and logs ``topic[partition]@offset``.

Several agents read every message of ``perfusion.events``; parsing and validating one event costs far more than
Faust's delivery of it, so their gates share one :class:`SharedParses`: the first gate to see a message parses it,
the others take the result (checked against the message's bytes) instead of parsing it again.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from streams.records import AnyEvent, DeadLetter, InvalidEvent, parse_event

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


@dataclass(slots=True)
class _SharedParse:
    raw: bytes
    result: ParseResult
    remaining: int  # readers still to take it


class SharedParses:
    """Parse results of one topic's messages, shared by the gates of the agents that read the topic (each gate
    built with ``shared=`` this object counts as one reader).

    An entry is keyed by the message's position and kept until every reader has taken it, or until ``capacity``
    newer entries pushed it out (a reader that lags that far, or never gets the message, parses it itself). A
    result is reused only for the very same bytes, so a position reused by a test or another cluster is harmless.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.readers = 0
        self.capacity = capacity
        self.parsed = 0
        self.reused = 0
        self._entries: dict[tuple[str, int, int], _SharedParse] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, raw: bytes, position: MessagePosition, parse: Callable[[bytes], ParseResult]) -> ParseResult:
        """The result for the message at ``position``: reused when another reader parsed these bytes already."""
        key = (position.topic, position.partition, position.offset)
        entry = self._entries.get(key)
        if entry is not None and (entry.raw is raw or entry.raw == raw):
            self.reused += 1
            entry.remaining -= 1
            if entry.remaining <= 0:
                del self._entries[key]
            return entry.result
        result = parse(raw)
        self.parsed += 1
        if self.readers > 1:
            self._entries.pop(key, None)  # different bytes at a reused position: the newest wins
            self._entries[key] = _SharedParse(raw, result, self.readers - 1)
            while len(self._entries) > self.capacity:
                del self._entries[next(iter(self._entries))]
        return result


class EventGate:
    """Validates raw inbound messages; invalid ones are dead-lettered through ``sink``, or only counted when
    ``sink`` is None. Gates given one ``shared`` parse each message once between them."""

    def __init__(
        self,
        sink: DeadLetterSink | None,
        clock: Callable[[], float] = time.time,
        shared: SharedParses | None = None,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._shared = shared
        if shared is not None:
            shared.readers += 1
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
        elif self._shared is None:
            result = _parse(raw, now)
        else:
            result = self._shared.take(raw, position, lambda message: _parse(message, now))
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
