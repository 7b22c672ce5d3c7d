"""``perfusion dlq list|replay``: the dead letters of ``perfusion.dlq``, and sending them again.

``list`` prints one line per dead letter, oldest first: where it is on the dead-letter topic, when it was
dead-lettered, where the message was read (``topic[partition]@offset``), its key, its size and the reason.
``replay`` sends the original bytes of each selected letter, with the original key and headers and a
``perfusion-replay-of`` header naming the letter, to the topic it was read from; a letter that kept only the first
bytes of a large message is refused, naming why. Both take the same filters (``--reason``, ``--since``,
``--until``, ``--limit``); ``replay --dry-run`` says what it would send and sends nothing.

A replayed event goes through the worker like any event: valid now (a worker that reads a newer minor, a stage whose
bug was fixed), it is folded; one the stages have already seen is dropped by its ``event_id``, so a letter replayed
twice counts once; invalid still, it is dead-lettered again, with the replay header among its headers.

The broker is found as every command finds it (``--bootstrap-servers``, ``KAFKA_BOOTSTRAP_SERVERS``, else the
project's running broker), reached with the Kafka security settings (``KAFKA_SECURITY_PROTOCOL``, ...), and the topic
names take ``--topic-prefix`` (``PERFUSION_TOPIC_PREFIX``).
"""

from __future__ import annotations

import argparse
import datetime
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from perfusion.errors import ConfigError
from perfusion.settings import KafkaClientSettings, KafkaSecuritySettings, add_flags, flag_overrides

if TYPE_CHECKING:
    from perfusion.contracts.records import DeadLetter
    from streams.dead_letters import MessagePosition

_AGO = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}
POLL_TIMEOUT_S = 30.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dlq",
        help="list dead letters or replay them to the topic they came from",
        description="The dead letters of perfusion.dlq (with the topic prefix): list them, or replay their original "
        "bytes with the original key and headers. A replayed event is deduplicated by event_id like any other.",
    )
    add_flags(parser, KafkaClientSettings)
    actions = parser.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    replay = actions.add_parser("replay", help="send the selected dead letters' messages again")
    for action in (listing, replay):
        action.add_argument("--reason", help="only letters whose reason holds this text (case-insensitive)")
        action.add_argument(
            "--since", help="only letters dead-lettered at or after: ISO time, epoch seconds, or an age (30m, 2h, 1d)"
        )
        action.add_argument("--until", help="only letters dead-lettered before: same forms as --since")
        action.add_argument("--limit", type=int, default=None, help="at most this many letters (the oldest)")
    replay.add_argument("--dry-run", action="store_true", help="print what would be replayed; send nothing")
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class LetterFilter:
    """Which dead letters a command takes."""

    reason: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def select(self, letters: Sequence[ReadLetter]) -> list[ReadLetter]:
        chosen = [
            read
            for read in letters
            if (self.reason is None or self.reason.lower() in read.letter.reason.lower())
            and (self.since is None or read.letter.ts >= self.since)
            and (self.until is None or read.letter.ts < self.until)
        ]
        return chosen if self.limit is None else chosen[: self.limit]


@dataclass(frozen=True)
class ReadLetter:
    """A dead letter and where it is on the dead-letter topic."""

    position: MessagePosition
    letter: DeadLetter


def run(args: argparse.Namespace) -> int:
    from perfusion.contracts.topics import TopicNames

    settings = KafkaClientSettings.from_env(**flag_overrides(args, KafkaClientSettings))
    selection = letter_filter(args)
    bootstrap = settings.resolved_bootstrap_servers()
    topic = TopicNames.for_prefix(settings.topic_prefix).dead_letters
    letters, unreadable = read_dead_letters(bootstrap, topic, settings.kafka_security)
    for position, error in unreadable:
        print(f"{position}  unreadable dead letter: {error}")
    chosen = selection.select(letters)
    if args.dlq_action == "list":
        for read in chosen:
            print(describe(read))
        print(f"{len(chosen)} of {len(letters)} dead letters on {topic}")
        return 0
    return replay(bootstrap, chosen, dry_run=args.dry_run, security=settings.kafka_security)


def letter_filter(args: argparse.Namespace, now: float | None = None) -> LetterFilter:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    return LetterFilter(
        reason=args.reason or None,
        since=parse_when("--since", args.since, now),
        until=parse_when("--until", args.until, now),
        limit=args.limit,
    )


def parse_when(flag: str, text: str | None, now: float | None = None) -> float | None:
    """Epoch seconds of ``text``: an ISO time (UTC when it names no zone), epoch seconds, or an age ``30m``."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    age = _AGO.fullmatch(text)
    if age is not None:
        return (time.time() if now is None else now) - float(age[1]) * _UNIT_S[age[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{flag} must be an ISO time (2026-12-02T06:00:00Z), epoch seconds or an age (30m, 2h, 1d), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def read_dead_letters(
    bootstrap: str, topic: str, security: KafkaSecuritySettings | None = None
) -> tuple[list[ReadLetter], list[tuple[MessagePosition, str]]]:
    """Every dead letter of ``topic`` up to its end now, oldest first (by the time each was dead-lettered), and the
    messages of the topic that are no dead letter, with why."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError
    from pydantic import ValidationError

    from perfusion.contracts.records import DeadLetter
    from perfusion.errors import InfrastructureError
    from perfusion.kafka_security import kafka_python_kwargs
    from streams.dead_letters import MessagePosition

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=2**21,
            allow_auto_create_topics=False,  # a wrong prefix must not create a one-partition topic
            **kafka_python_kwargs(security),
        )
    except KafkaError as exc:
        raise InfrastructureError(
            f"cannot reach Kafka at {bootstrap!r} ({exc}); start it with `perfusion broker up`"
        ) from exc
    letters: list[ReadLetter] = []
    unreadable: list[tuple[MessagePosition, str]] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return [], []  # no topic yet: nothing was ever dead-lettered
        assigned = [TopicPartition(topic, partition) for partition in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise InfrastructureError(f"reading {topic} from {bootstrap} took more than {POLL_TIMEOUT_S:.0f} s")
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    position = MessagePosition(tp.topic, tp.partition, record.offset)
                    try:
                        letters.append(ReadLetter(position, DeadLetter.model_validate_json(record.value or b"")))
                    except ValidationError as exc:
                        unreadable.append((position, str(exc).replace("\n", " ")[:300]))
    finally:
        consumer.close()
    letters.sort(key=lambda read: (read.letter.ts, read.position.partition, read.position.offset))
    return letters, unreadable


def describe(read: ReadLetter) -> str:
    """One line: letter position, time, source position, key, size, reason."""
    letter = read.letter
    when = datetime.datetime.fromtimestamp(letter.ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    size = f"{letter.original_size}B" + (" truncated" if letter.truncated else "")
    source = f"{letter.topic}[{letter.partition}]@{letter.offset}"
    return f"{read.position}  {when}  from {source}  key={shown_key(letter.key_b64)}  {size}  {letter.reason}"


def shown_key(key_b64: str | None) -> str:
    """The key as text when it is printable UTF-8, else ``b64:<base64>``; ``-`` for none."""
    import base64

    if key_b64 is None:
        return "-"
    raw = base64.b64decode(key_b64)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"b64:{key_b64}"
    return text if text.isprintable() and " " not in text else f"b64:{key_b64}"


def replay(
    bootstrap: str, chosen: Sequence[ReadLetter], dry_run: bool, security: KafkaSecuritySettings | None = None
) -> int:
    """Send each letter's message again (or say what would be sent); 1 when some letter could not be replayed."""
    from kafka import KafkaProducer

    from perfusion.kafka_security import kafka_python_kwargs
    from streams.dead_letters import NotReplayable, ReplayMessage, replay_message

    ready: list[tuple[ReadLetter, ReplayMessage]] = []
    refused = 0
    for read in chosen:
        try:
            ready.append((read, replay_message(read.letter, read.position)))
        except NotReplayable as exc:
            refused += 1
            print(f"{read.position}  not replayed: {exc}")
    verb = "would replay" if dry_run else "replayed"
    if not dry_run and ready:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, **kafka_python_kwargs(security))
        try:
            futures = [
                producer.send(message.topic, key=message.key, value=message.value, headers=message.headers)
                for _, message in ready
            ]
            producer.flush()
            for future in futures:
                future.get(timeout=30)
        finally:
            producer.close()
    for read, message in ready:
        key = shown_key(read.letter.key_b64)
        print(f"{read.position}  {verb} to {message.topic}  key={key}  {len(message.value)}B")
    print(f"{verb} {len(ready)} of {len(chosen)} dead letters" + (f"; {refused} not replayable" if refused else ""))
    return 1 if refused else 0
