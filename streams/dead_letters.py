"""The one place that decides what happens to an inbound message that is not a valid event.

The events agent (:mod:`streams.agents.events`) passes each message of ``perfusion.events`` through a *writing*
:class:`EventGate`, which sends each invalid message to the dead-letter topic as a
:class:`~perfusion.contracts.records.DeadLetter` with the reason and the original bytes. A *counting* gate (no sink),
used for the internal demand topic whose messages were admitted once already, skips and counts them. Either way the
worker keeps running and logs ``topic[partition]@offset``.

The same letter carries an event that was valid but that a stage could not process (:func:`dead_letter` with the
stage's exception as reason): whatever one message does, it ends in state or here, and the rest of its batch goes on.
A dead letter stays under the producer's request limit (1 MiB by default): a message larger than
:data:`MAX_ORIGINAL_BYTES` keeps only its first bytes, with the size and sha256 of the whole.

A dead letter can be replayed (``perfusion dlq replay``): :func:`replay_message` gives the original bytes, key and
headers for the original topic, with a :data:`REPLAY_HEADER` naming the dead letter, or :class:`NotReplayable` when
the letter does not hold the whole message. A replayed event is an event like any other: the stages drop one they
have seen by its ``event_id``, so replaying it twice counts it once.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from perfusion.contracts.records import AnyEvent, DeadLetter, InvalidEvent, parse_event
from perfusion.errors import PerfusionError

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


MAX_ORIGINAL_BYTES = 256 * 1024  # 342 KiB once in base64, well under the producer's 1 MiB request limit
MAX_KEY_BYTES = 1024
MAX_HEADER_BYTES = 16 * 1024  # names and values of all headers together
MAX_REASON_CHARS = 1000

MessageHeaders = Mapping[str, bytes] | Iterable[tuple[str, bytes | None]] | None
"""A message's headers as aiokafka or Faust give them: a mapping or (name, value) pairs."""


def dead_letter(
    raw: bytes | None,
    reason: str,
    position: MessagePosition,
    now: float | None = None,
    key: bytes | None = None,
    headers: MessageHeaders = None,
) -> DeadLetter:
    """The dead letter of one unusable message; ``raw`` None (a tombstone) is kept as empty bytes. Every part is
    bounded, so the letter itself can always be sent."""
    original = raw or b""
    excerpt = original[:MAX_ORIGINAL_BYTES]
    return DeadLetter(
        reason=reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "...",
        original_b64=base64.b64encode(excerpt).decode("ascii"),
        original_size=len(original),
        original_sha256=hashlib.sha256(original).hexdigest(),
        truncated=len(excerpt) < len(original),
        key_b64=None if key is None else base64.b64encode(key[:MAX_KEY_BYTES]).decode("ascii"),
        headers=_bounded_headers(headers),
        topic=position.topic,
        partition=position.partition,
        offset=position.offset,
        ts=time.time() if now is None else now,
    )


def _bounded_headers(headers: MessageHeaders) -> list[tuple[str, str]]:
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    kept: list[tuple[str, str]] = []
    room = MAX_HEADER_BYTES
    for name, value in pairs:
        size = len(name) + len(value or b"")
        if size > room:
            break
        room -= size
        kept.append((str(name), base64.b64encode(value or b"").decode("ascii")))
    return kept


def failure_reason(stage: str, exc: BaseException) -> str:
    """Why a valid event was dead-lettered: the stage that raised and what."""
    return f"{stage} could not process the event: {type(exc).__name__}: {exc}".replace("\n", " ")


def original_bytes(letter: DeadLetter) -> bytes:
    return base64.b64decode(letter.original_b64)


REPLAY_HEADER = "perfusion-replay-of"
"""Header of a replayed message: ``<dead-letter topic>[partition]@offset`` of the letter it was replayed from."""


class NotReplayable(PerfusionError):
    """A dead letter that does not hold the message it stands for; the message says why."""


@dataclass(frozen=True)
class ReplayMessage:
    """What replaying one dead letter produces: the original message, to its original topic."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def replay_message(letter: DeadLetter, letter_position: MessagePosition) -> ReplayMessage:
    """The message ``letter`` (read at ``letter_position``) holds, with its key and headers and a
    :data:`REPLAY_HEADER`; :class:`NotReplayable` when it holds only part of it, or nothing."""
    source = MessagePosition(letter.topic, letter.partition, letter.offset)
    if letter.truncated:
        raise NotReplayable(
            f"truncated: the letter keeps the first {len(original_bytes(letter))} of {letter.original_size} bytes "
            f"of {source}; the whole message (sha256 {letter.original_sha256}) is only on {letter.topic} while its "
            "retention keeps it"
        )
    value = original_bytes(letter)
    if not value:
        raise NotReplayable(f"empty: the message at {source} was a tombstone; there is nothing to replay")
    if letter.original_sha256 and hashlib.sha256(value).hexdigest() != letter.original_sha256:
        raise NotReplayable(f"damaged: the bytes kept of {source} do not match the letter's sha256")
    headers = [(name, base64.b64decode(encoded)) for name, encoded in letter.headers]
    headers.append((REPLAY_HEADER, str(letter_position).encode()))
    key = None if letter.key_b64 is None else base64.b64decode(letter.key_b64)
    return ReplayMessage(topic=letter.topic, key=key, value=value, headers=headers)


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

    async def admit(
        self, raw: bytes | None, position: MessagePosition, key: bytes | None = None, headers: MessageHeaders = None
    ) -> AnyEvent | None:
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
        letter = dead_letter(raw, reason, position, now=now, key=key, headers=headers)
        await self._sink(position.dead_letter_key(), letter)
        return None


def _parse(raw: bytes, now: float) -> ParseResult:
    try:
        return parse_event(raw, now=now)
    except InvalidEvent as exc:
        return exc
    except Exception as exc:  # parse_event promises InvalidEvent only; a message must not crash the worker if not
        log.exception("parse_event raised %s instead of InvalidEvent", type(exc).__name__)
        return InvalidEvent(f"could not be parsed: {type(exc).__name__}: {exc}")


def _reason_kind(reason: str) -> str:
    """A short bucket for counting: the text before the first colon, or the first three words."""
    head = reason.split(":", 1)[0]
    return head if len(head) <= 40 else " ".join(reason.split()[:3])
