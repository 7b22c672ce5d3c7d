"""The events agent's error policy in process, with the real stages (preferences, groups, demand routing) over a
Faust app that is never started: every send and changelog record is acknowledged at once and recorded.

Properties: whatever messages a batch holds, processing it never raises, and every message ends in exactly one of
state (folded), the dead-letter topic, or a resend under its user id (a wrong key). A stage that raises for one
event costs that event only: it is dead-lettered with the stage's reason and the rest of the batch reaches the
state it would have reached without it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perfusion.contracts.records import AnyEvent, DeadLetter, InvalidEvent, parse_event
from simulator.traffic import TrafficConfig, TrafficSimulator, encode
from streams.agents.events import EVENT_STAGE_MODULES, AdmittedEvent, EventsAgent, EventStage, ReadMessage
from streams.dead_letters import MessagePosition, original_bytes
from streams.settings import StreamSettings
from tests.streams.test_preferences_agent import Crashes, acknowledged, assert_features_close, reference_features

NOW = 1_700_000_000.0
EVENTS_TOPIC = "inproc.perfusion.events"


@dataclass
class Effects:
    """Everything the stages sent, by topic, and the Feast rows they pushed."""

    sent: dict[str, list[tuple[bytes | None, bytes | None]]] = field(default_factory=dict)
    pushed: list[dict[str, Any]] = field(default_factory=list)

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        return self.sent.get(topic, [])

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(value or b"") for _, value in self.on("inproc.perfusion.dlq")]


def record_sends(target: Any, name: str, effects: Effects) -> None:
    async def send(key: bytes | None = None, value: bytes | None = None, **_: Any) -> asyncio.Future[None]:
        effects.sent.setdefault(name, []).append((key, value))
        return acknowledged()

    def send_soon(key: bytes | None = None, value: bytes | None = None, **_: Any) -> None:
        effects.sent.setdefault(name, []).append((key, value))

    target.send = send
    target.send_soon = send_soon


class RaisingStage:
    """A stage that raises for events whose id starts with ``boom``: the fault the policy must contain."""

    def __init__(self) -> None:
        self.folded: list[str] = []
        self._pending: list[str] = []

    async def fold(self, batch: Sequence[AdmittedEvent]) -> None:
        for admitted in batch:
            if admitted.event.event_id.startswith("boom"):
                raise RuntimeError(f"cannot take {admitted.event.event_id}")
            self._pending.append(admitted.event.event_id)

    async def commit(self) -> None:
        self.folded.extend(self._pending)
        self._pending = []

    def discard(self) -> None:
        self._pending = []


def events_agent(tmp_path: Path, extra_stages: Sequence[tuple[str, EventStage]] = ()) -> tuple[EventsAgent, Effects]:
    """The events agent with the worker's stages (and ``extra_stages`` after them), its effects recorded."""
    import faust

    from streams.context import AgentContext
    from streams.topics import declare_topics

    effects = Effects()
    crashes = Crashes()
    settings = StreamSettings(bootstrap_servers="localhost:9", topic_prefix="inproc.", data_dir=tmp_path)
    app = faust.App(settings.group_id, broker="kafka://localhost:9", store="memory://", datadir=str(tmp_path))
    topics = declare_topics(app, settings)

    async def push(rows: list[dict[str, Any]]) -> None:
        effects.pushed.extend(rows)

    async def send_dead_letter(key: bytes, letter: DeadLetter) -> None:
        effects.sent.setdefault(topics.dead_letters.get_topic_name(), []).append((key, letter.to_bytes()))

    context = AgentContext(
        app=app, topics=topics, settings=settings, dead_letter_sink=send_dead_letter, feature_sink=push,
        event_stage_modules=EVENT_STAGE_MODULES, on_crash=crashes.append_and_raise,
    )  # fmt: skip
    stages = [(name.rsplit(".", 1)[-1], importlib.import_module(name).stage(context)) for name in EVENT_STAGE_MODULES]
    from streams.agents.demand import _by_design_topic
    from streams.agents.training import by_version_topic

    named = [getattr(topics, name) for name in ("events", "group_samples", "group_drops", "production_orders")]
    for topic in (*named, _by_design_topic(context), by_version_topic(context)):
        record_sends(topic, topic.get_topic_name(), effects)
    for table in app.tables.values():
        record_sends(table.changelog_topic, table.changelog_topic.get_topic_name(), effects)
    return EventsAgent(context, [*stages, *extra_stages]), effects


def messages(raws: Sequence[tuple[bytes | None, bytes | None]], partitions: int = 4) -> list[ReadMessage]:
    headers = [("trace", b"t")]
    return [
        ReadMessage(value, key, headers, MessagePosition(EVENTS_TOPIC, n % partitions, n))
        for n, (key, value) in enumerate(raws)
    ]


def good_events(seed: int, count: int) -> list[AnyEvent]:
    return TrafficSimulator(TrafficConfig(seed=seed, start_ts=NOW - 7200, mean_gap_s=30.0)).events(count)


# Messages no event can be: each kind of poison the loop has met.
POISONS: dict[str, bytes] = {
    "nested deeper": b'{"kind": "click", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "integer of 5000 digits": b'{"kind": "order", "quantity": ' + b"9" * 5000 + b"}",
    "NaN is not a number": b'{"kind": "click", "event_id": "n", "ts": NaN, "user_id": "u"}',
    "more than 65536": b'{"kind": "click", "pad": "' + b"x" * 900_000 + b'"}',
    "schema_version True": b'{"kind": "click", "schema_version": true}',
}

hostile_messages = st.one_of(
    st.sampled_from(sorted(POISONS.values())),
    st.binary(max_size=64),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=12,
    ).map(lambda value: json.dumps(value).encode()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**16),
    hostile=st.lists(hostile_messages, max_size=12),
    wrong_keys=st.integers(0, 3),
    booms=st.integers(0, 3),
)
def test_every_message_of_any_batch_ends_in_state_or_dead_letter_and_nothing_raises(
    tmp_path: Path, seed: int, hostile: list[bytes], wrong_keys: int, booms: int
) -> None:
    rng = random.Random(seed)
    events = good_events(seed, 40)
    boom_events = [e.model_copy(update={"event_id": f"boom-{n}"}) for n, e in enumerate(rng.sample(events, booms))]
    rekeyed_events = rng.sample(events, wrong_keys)
    raws: list[tuple[bytes | None, bytes | None]] = [encode(e) for e in events if e not in rekeyed_events]
    raws += [(b"someone-else", e.to_bytes()) for e in rekeyed_events]
    raws += [encode(e) for e in boom_events]
    raws += [(b"u", value) for value in hostile]
    raws.append((b"u", None))  # a tombstone
    rng.shuffle(raws)
    raising = RaisingStage()
    agent, effects = events_agent(tmp_path, [("probe", raising)])
    batch = messages(raws)

    asyncio.run(agent.process(batch))

    def valid(value: bytes | None) -> bool:
        try:
            parse_event(value or b"", now=NOW + 86_400)
        except InvalidEvent:
            return False
        return True

    letters = effects.dead_letters()
    lettered = {letter.offset for letter in letters}
    assert len(lettered) == len(letters), "a message was dead-lettered twice"
    resent = [value for _, value in effects.on(EVENTS_TOPIC)]
    folded = {event_id for event_id in raising.folded}
    for message in batch:
        ends = [message.position.offset in lettered, message.value in resent and message.key == b"someone-else"]
        is_event = message.value is not None and valid(message.value)
        event_id = parse_event(message.value or b"", now=NOW + 86_400).event_id if is_event else None
        ends.append(event_id in folded and message.key != b"someone-else")
        assert sum(ends) == 1, f"message at {message.position} ended in {ends}"
        if event_id is not None and event_id.startswith("boom"):
            assert message.position.offset in lettered
    assert agent.counts["folded"] + agent.counts["dead_letter"] + agent.counts["rekeyed"] == len(batch)
    for letter in letters:
        assert letter.headers == [("trace", "dA==")] and letter.key_b64 is not None
    # The real stages took exactly the events that were folded: the users' features are the batch recomputation.
    taken = [e for e in events if e not in rekeyed_events]
    latest = {row["user_id"]: row for row in effects.pushed}
    expected = reference_features(taken, StreamSettings(bootstrap_servers="localhost:9"))
    assert set(latest) == set(expected)
    for user_id, row in latest.items():
        assert_features_close(row, expected[user_id])


def test_a_stage_that_raises_for_one_event_costs_that_event_only(tmp_path: Path) -> None:
    events = good_events(7, 60)
    boom = events[10].model_copy(update={"event_id": "boom-1"})
    raising = RaisingStage()
    agent, effects = events_agent(tmp_path, [("probe", raising)])
    raws = [encode(e) for e in events[:30]] + [encode(boom)] + [encode(e) for e in events[30:]]
    asyncio.run(agent.process(messages(raws)))
    [letter] = effects.dead_letters()
    assert letter.reason == "probe could not process the event: RuntimeError: cannot take boom-1"
    assert original_bytes(letter) == boom.to_bytes() and letter.offset == 30
    assert raising.folded == [e.event_id for e in events]
    latest = {row["user_id"]: row for row in effects.pushed}
    for user_id, row in reference_features(events, StreamSettings(bootstrap_servers="localhost:9")).items():
        assert_features_close(latest[user_id], row)


def test_a_poison_of_each_kind_is_dead_lettered_with_its_reason_and_the_batch_goes_on(tmp_path: Path) -> None:
    events = good_events(3, 50)
    agent, effects = events_agent(tmp_path)
    raws = (
        [encode(e) for e in events[:25]] + [(b"u", raw) for raw in POISONS.values()] + [encode(e) for e in events[25:]]
    )
    asyncio.run(agent.process(messages(raws)))
    letters = {letter.offset: letter for letter in effects.dead_letters()}
    assert sorted(letters) == list(range(25, 25 + len(POISONS)))
    for offset, (reason, raw) in enumerate(POISONS.items(), start=25):
        letter = letters[offset]
        assert reason in letter.reason
        assert letter.original_size == len(raw) and len(letter.to_bytes()) < 1_000_000
        assert letter.truncated == (len(raw) > 256 * 1024)
        assert original_bytes(letter) == raw[: 256 * 1024]
    assert agent.counts["folded"] == len(events)
    latest = {row["user_id"]: row for row in effects.pushed}
    assert set(latest) == {e.user_id for e in events}
    assert not math.isnan(sum(row["last_active_ts"] for row in latest.values()))


def test_an_event_keyed_by_someone_else_is_sent_again_under_its_user_id(tmp_path: Path) -> None:
    event = good_events(1, 1)[0]
    agent, effects = events_agent(tmp_path)
    asyncio.run(agent.process(messages([(b"wrong", event.to_bytes()), (None, event.to_bytes())])))
    assert effects.on(EVENTS_TOPIC) == [(event.user_id.encode(), event.to_bytes())] * 2
    assert effects.pushed == [] and agent.counts["rekeyed"] == 2


@pytest.mark.parametrize("poison", ["nested deeper", "integer of 5000 digits"])
def test_parse_event_never_raises_anything_but_invalid_event_on_a_poison(poison: str) -> None:
    with pytest.raises(InvalidEvent, match=poison):
        parse_event(POISONS[poison], now=NOW)
