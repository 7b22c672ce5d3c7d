"""``perfusion dlq``: the filters, the lines it prints, and what a replay sends (or refuses), without a broker."""

from __future__ import annotations

import argparse
import base64

import pytest

from ops.commands.dlq import LetterFilter, ReadLetter, describe, letter_filter, parse_when, replay, shown_key
from perfusion.contracts.records import Order
from perfusion.errors import ConfigError
from streams.dead_letters import (
    MAX_ORIGINAL_BYTES,
    REPLAY_HEADER,
    MessagePosition,
    NotReplayable,
    dead_letter,
    replay_message,
)

NOW = 1_800_000_000.0
ORDER = Order(event_id="o1", ts=NOW - 60, user_id="u1", impression_id="i1", design_id="d1", image_id="x", quantity=2)


def read_letter(
    offset: int, reason: str, raw: bytes = ORDER.to_bytes(), ts: float = NOW, key: bytes | None = b"u1"
) -> ReadLetter:
    letter = dead_letter(
        raw, reason, MessagePosition("p.perfusion.events", 2, 40 + offset), now=ts, key=key,
        headers=[("trace", b"t-1"), ("empty", None)],
    )  # fmt: skip
    return ReadLetter(MessagePosition("p.perfusion.dlq", 0, offset), letter)


def test_replay_message_is_the_original_with_its_key_headers_and_a_replay_header() -> None:
    read = read_letter(7, "demand could not process the event: KeyError: 'd1'")
    message = replay_message(read.letter, read.position)
    assert (message.topic, message.key, message.value) == ("p.perfusion.events", b"u1", ORDER.to_bytes())
    assert message.headers == [("trace", b"t-1"), ("empty", b""), (REPLAY_HEADER, b"p.perfusion.dlq[0]@7")]


def test_a_truncated_letter_is_not_replayable_naming_why() -> None:
    raw = b'{"kind": "click", "pad": "' + b"x" * (MAX_ORIGINAL_BYTES + 10) + b'"}'
    read = read_letter(3, "event is ... bytes", raw=raw)
    with pytest.raises(NotReplayable, match=rf"truncated: the letter keeps the first {MAX_ORIGINAL_BYTES} of"):
        replay_message(read.letter, read.position)


def test_a_tombstone_or_damaged_letter_is_not_replayable() -> None:
    with pytest.raises(NotReplayable, match="tombstone"):
        read = read_letter(1, "empty message", raw=b"")
        replay_message(read.letter, read.position)
    read = read_letter(2, "r")
    damaged = read.letter.model_copy(update={"original_b64": base64.b64encode(b"{}").decode()})
    with pytest.raises(NotReplayable, match="do not match"):
        replay_message(damaged, read.position)


def test_replay_refuses_a_truncated_letter_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    big = read_letter(3, "event is large", raw=b"x" * (MAX_ORIGINAL_BYTES + 1))
    assert replay("unused:9092", [big], dry_run=False) == 1  # nothing to send: no producer is opened
    out = capsys.readouterr().out
    assert "p.perfusion.dlq[0]@3  not replayed: truncated" in out and "replayed 0 of 1" in out


def test_a_dry_run_says_what_it_would_replay_and_sends_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert replay("unused:9092", [read_letter(5, "r")], dry_run=True) == 0
    out = capsys.readouterr().out
    assert "p.perfusion.dlq[0]@5  would replay to p.perfusion.events  key=u1" in out


def test_filters_by_reason_time_and_limit() -> None:
    letters = [
        read_letter(0, "unknown schema_version '2.0': major 2 is incompatible", ts=NOW - 7200),
        read_letter(1, "order.gift_wrap: Extra inputs are not permitted", ts=NOW - 3600),
        read_letter(2, "Unknown schema_version 3", ts=NOW - 60),
    ]
    offsets = lambda chosen: [read.position.offset for read in chosen]  # noqa: E731
    assert offsets(LetterFilter(reason="SCHEMA_VERSION").select(letters)) == [0, 2]
    assert offsets(LetterFilter(since=NOW - 3600).select(letters)) == [1, 2]
    assert offsets(LetterFilter(until=NOW - 3600).select(letters)) == [0]
    assert offsets(LetterFilter(reason="schema", limit=1).select(letters)) == [0]


def test_times_are_iso_epoch_seconds_or_an_age() -> None:
    assert parse_when("--since", "2027-01-15T08:00:00Z") == NOW
    assert parse_when("--since", "2027-01-15T08:00:00") == parse_when("--since", "2027-01-15T09:00:00+01:00")
    assert parse_when("--since", "1800000000") == NOW
    assert parse_when("--since", "90m", now=NOW) == NOW - 5400
    assert parse_when("--since", "2d", now=NOW) == NOW - 2 * 86_400
    assert parse_when("--since", None) is None
    with pytest.raises(ConfigError, match="--until must be an ISO time"):
        parse_when("--until", "last tuesday")
    with pytest.raises(ConfigError, match="--limit must be at least 1"):
        letter_filter(argparse.Namespace(limit=0, reason=None, since=None, until=None))


def test_a_line_names_the_letter_time_source_key_size_and_reason() -> None:
    line = describe(read_letter(9, "order.quantity: Input should be a valid integer", ts=NOW))
    size = len(ORDER.to_bytes())
    assert line == (
        f"p.perfusion.dlq[0]@9  2027-01-15T08:00:00Z  from p.perfusion.events[2]@49  key=u1  {size}B  "
        "order.quantity: Input should be a valid integer"
    )
    assert shown_key(None) == "-" and shown_key(base64.b64encode(b"\xff\x00").decode()) == "b64:/wA="
