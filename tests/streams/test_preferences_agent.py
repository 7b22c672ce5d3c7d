"""The preference agent: its pure update logic on hand-checked cases (shoppers' clicks and orders, merchants'
selections), a batch recomputation from the raw events, the user vector's taste over rounds, the dead-letter gate,
and the Faust agent in-process with ``test_context()``."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import pytest

from perfusion.attributes import DESCRIPTOR_DIM, Attributes
from perfusion.contracts.records import (
    AnyEvent,
    Candidate,
    Click,
    DeadLetter,
    Impression,
    Order,
    Return,
    Select,
    parse_event,
)
from perfusion.user_features import USER_VECTOR_SLICES, taste_part, user_vector
from simulator.traffic import TrafficConfig, TrafficSimulator, encode
from streams.dead_letters import EventGate, MessagePosition
from streams.settings import StreamSettings

from streams.preferences import (  # isort: skip
    PREFERENCE_FEATURES,
    PreferenceUpdater,
    UserPreferenceState,
)

T0 = 1_700_000_000.0
SETTINGS = StreamSettings(bootstrap_servers="localhost:9", preference_half_life_s=3600.0)
A = Attributes("dress", "red", "plain", "short-sleeve", "slim").descriptor()
B = Attributes("jacket", "navy", "striped", "long-sleeve", "loose").descriptor()


class DictMemory(dict[str, Mapping[str, list[float]]]):
    """Impression descriptors in a plain dict (the agent keeps them in a Faust table)."""

    def put(self, impression_id: str, descriptors: Mapping[str, list[float]]) -> None:
        self[impression_id] = descriptors

    def forget(self, impression_id: str) -> None:
        self.pop(impression_id, None)


def impression(event_id: str, ts: float, user_id: str = "u1") -> Impression:
    return Impression(
        event_id=event_id, ts=ts, user_id=user_id, design_id="d1", prompt="a dress", model_version="v1",
        candidates=[
            Candidate(image_id="a", position=0, descriptor=A), Candidate(image_id="b", position=1, descriptor=B)
        ],
    )  # fmt: skip


def click(event_id: str, ts: float, image_id: str, impression_id: str = "i1") -> Click:
    return Click(event_id=event_id, ts=ts, user_id="u1", impression_id=impression_id, design_id="d1", image_id=image_id)


def order(event_id: str, ts: float, image_id: str, impression_id: str = "i1") -> Order:
    return Order(
        event_id=event_id, ts=ts, user_id="u1", impression_id=impression_id, design_id="d1", image_id=image_id,
        quantity=1,
    )  # fmt: skip


def select(event_id: str, ts: float, image_ids: list[str], impression_id: str = "i1", user_id: str = "u1") -> Select:
    return Select(
        event_id=event_id, ts=ts, user_id=user_id, impression_id=impression_id, design_id="d1", image_ids=image_ids
    )


def returned(event_id: str, ts: float, image_id: str, order_id: str) -> Return:
    return Return(
        event_id=event_id, ts=ts, user_id="u1", order_id=order_id, impression_id="i1", design_id="d1",
        image_id=image_id, quantity=1,
    )  # fmt: skip


def fold(events: Iterable[AnyEvent], settings: StreamSettings = SETTINGS, user_id: str = "u1") -> dict[str, Any]:
    updater, memory = PreferenceUpdater(settings), DictMemory()
    state = UserPreferenceState(user_id=user_id)
    for event in events:
        updater.apply(state, event, memory)
    return updater.features(state)


def reference_features(events: Iterable[AnyEvent], settings: StreamSettings) -> dict[str, dict[str, Any]]:
    """Batch recomputation from the raw event log, per user, straight from the definitions."""
    unique: dict[str, AnyEvent] = {}
    for event in events:
        unique.setdefault(event.event_id, event)
    by_user: dict[str, list[AnyEvent]] = {}
    for event in unique.values():
        by_user.setdefault(event.user_id, []).append(event)
    weights = {
        "click": settings.click_weight,
        "select": settings.click_weight,
        "order": settings.order_weight,
        "return": -settings.order_weight,
    }
    out: dict[str, dict[str, Any]] = {}
    for user_id, user_events in by_user.items():
        latest = max(e.ts for e in user_events)
        latest_minute = math.floor(latest / 60)
        row: dict[str, Any] = {}
        for kind, plural in (
            ("impression", "impressions"),
            ("click", "clicks"),
            ("order", "orders"),
            ("return", "returns"),
        ):
            stamps = [e.ts for e in user_events if e.kind == kind]
            row[f"{plural}_1h"] = sum(math.floor(ts / 60) > latest_minute - 60 for ts in stamps)
            row[f"{plural}_1d"] = sum(math.floor(ts / 60) > latest_minute - 1440 for ts in stamps)
            row[f"{plural}_total"] = len(stamps)
        images_shown = sum(len(e.candidates) for e in user_events if isinstance(e, Impression))
        shown = {
            e.event_id: {c.image_id: c.descriptor for c in e.candidates}
            for e in user_events
            if isinstance(e, Impression)
        }
        # A selection is one interaction per distinct selected candidate; the impressions selected from are reviews.
        selections = [
            (e.impression_id, image_id, e.ts)
            for e in user_events
            if isinstance(e, Select)
            for image_id in dict.fromkeys(e.image_ids)
            if image_id in shown.get(e.impression_id, {})
        ]
        reviewed = sum(len(shown[impression_id]) for impression_id in {i for i, _, _ in selections})
        row["images_shown_total"] = images_shown
        row["images_reviewed_total"] = reviewed
        row["images_selected_total"] = len(selections)
        outside_reviews = images_shown - reviewed
        row["ctr"] = row["clicks_total"] / outside_reviews if outside_reviews else 0.0
        row["cvr"] = row["orders_total"] / row["clicks_total"] if row["clicks_total"] else 0.0
        interactions = [
            (weights[e.kind], e.ts, shown[e.impression_id][e.image_id])
            for e in user_events
            if isinstance(e, Click | Order | Return) and e.image_id in shown.get(e.impression_id, {})
        ] + [(weights["select"], ts, shown[impression_id][image_id]) for impression_id, image_id, ts in selections]
        reference = max((ts for _, ts, _ in interactions), default=0.0)
        decayed = [(w * 2.0 ** (-(reference - ts) / settings.preference_half_life_s), d) for w, ts, d in interactions]
        total = sum(w for w, _ in decayed)
        row["preference"] = (
            [max(0.0, sum(w * d[i] for w, d in decayed) / total) for i in range(DESCRIPTOR_DIM)]
            if total > 1e-12
            else [0.0] * DESCRIPTOR_DIM
        )
        row["last_active_ts"] = latest
        out[user_id] = row
    return out


def assert_features_close(actual: Mapping[str, Any], expected: Mapping[str, Any], tolerance: float = 1e-6) -> None:
    for name in PREFERENCE_FEATURES:
        if name == "preference":
            assert actual[name] == pytest.approx(expected[name], abs=tolerance), name
        elif isinstance(expected[name], float):
            assert actual[name] == pytest.approx(expected[name], rel=tolerance, abs=tolerance), name
        else:
            assert actual[name] == expected[name], name


# ----------------------------------------------------------------------------------------------- hand-checked


def test_counts_per_window_in_event_time() -> None:
    events = [
        impression("i1", T0 - 2 * 86_400),  # older than a day: total only
        impression("i2", T0 - 3 * 3600),  # within the day, not the hour
        impression("i3", T0 - 30 * 60),
        click("c1", T0 - 20 * 60, "a", impression_id="i3"),
        impression("i4", T0),
    ]
    features = fold(events)
    assert (features["impressions_1h"], features["impressions_1d"], features["impressions_total"]) == (2, 3, 4)
    assert (features["clicks_1h"], features["clicks_1d"], features["clicks_total"]) == (1, 1, 1)
    assert features["ctr"] == pytest.approx(1 / 8)  # one click, four impressions of two images
    assert features["cvr"] == 0.0
    assert features["last_active_ts"] == T0


def test_cvr_is_orders_over_clicks() -> None:
    features = fold(
        [impression("i1", T0), click("c1", T0 + 1, "a"), click("c2", T0 + 2, "b"), order("o1", T0 + 3, "a")]
    )
    assert features["cvr"] == pytest.approx(0.5)
    assert features["ctr"] == pytest.approx(1.0)  # both images of the one impression clicked


def test_preference_weighs_orders_three_times_clicks() -> None:
    features = fold([impression("i1", T0), click("c1", T0, "a"), order("o1", T0, "b")])
    expected = [(1.0 * a + 3.0 * b) / 4.0 for a, b in zip(A, B, strict=True)]
    assert features["preference"] == pytest.approx(expected)


def test_preference_halves_an_interaction_one_half_life_older() -> None:
    features = fold([impression("i1", T0), click("c1", T0, "a"), click("c2", T0 + 3600, "b")])
    expected = [(0.5 * a + 1.0 * b) / 1.5 for a, b in zip(A, B, strict=True)]
    assert features["preference"] == pytest.approx(expected)


def test_a_return_takes_its_order_back() -> None:
    features = fold(
        [impression("i1", T0), click("c1", T0, "a"), order("o1", T0, "b"), returned("r1", T0, "b", order_id="o1")]
    )
    assert features["preference"] == pytest.approx(A)
    assert features["returns_total"] == 1
    only_returned = fold([impression("i1", T0), order("o1", T0, "b"), returned("r1", T0, "b", order_id="o1")])
    assert only_returned["preference"] == [0.0] * DESCRIPTOR_DIM


def test_a_merchants_selection_moves_their_descriptor_as_a_click_would() -> None:
    shown = impression("i1", T0, user_id="m1")
    selected = fold([shown, select("s1", T0 + 5, ["a"], user_id="m1")], user_id="m1")
    assert selected["preference"] == pytest.approx(A)
    clicked = fold([impression("i1", T0), click("c1", T0 + 5, "a")])
    assert selected["preference"] == pytest.approx(clicked["preference"])
    assert (selected["images_shown_total"], selected["images_reviewed_total"], selected["images_selected_total"]) == (
        2,
        2,
        1,
    )
    assert selected["ctr"] == 0.0 and selected["clicks_total"] == 0  # a review is not a shown-and-not-clicked group
    both = fold([shown, select("s1", T0 + 5, ["a", "b", "a"], user_id="m1")], user_id="m1")
    assert both["preference"] == pytest.approx([(a + b) / 2 for a, b in zip(A, B, strict=True)])
    assert both["images_selected_total"] == 2  # each candidate once


def test_a_second_selection_of_one_group_reviews_it_once_and_a_foreign_image_is_ignored() -> None:
    events = [
        impression("i1", T0, user_id="m1"),
        select("s1", T0 + 9, ["a"], user_id="m1"),
        select("s2", T0 + 9, ["b"], user_id="m1"),
        select("s3", T0 + 9, ["not-a-candidate"], user_id="m1"),
    ]
    features = fold(events, user_id="m1")
    assert (features["images_reviewed_total"], features["images_selected_total"]) == (2, 2)
    assert features["preference"] == pytest.approx([(a + b) / 2 for a, b in zip(A, B, strict=True)])


def test_a_selection_before_its_impression_waits_for_it() -> None:
    in_order = fold([impression("i1", T0, user_id="m1"), select("s1", T0 + 5, ["b"], user_id="m1")], user_id="m1")
    reordered = fold([select("s1", T0 + 5, ["b"], user_id="m1"), impression("i1", T0, user_id="m1")], user_id="m1")
    assert_features_close(reordered, in_order)
    assert reordered["preference"] == pytest.approx(B)


def test_duplicate_event_ids_change_nothing() -> None:
    updater, memory = PreferenceUpdater(SETTINGS), DictMemory()
    state = UserPreferenceState(user_id="u1")
    assert updater.apply(state, impression("i1", T0), memory)
    assert updater.apply(state, click("c1", T0, "a"), memory)
    before = updater.features(state)
    assert not updater.apply(state, click("c1", T0, "a"), memory)
    assert not updater.apply(state, impression("i1", T0), memory)
    assert updater.features(state) == before
    assert updater.apply(state, select("s1", T0 + 1, ["b"]), memory)
    after_select = updater.features(state)
    assert not updater.apply(state, select("s1", T0 + 1, ["b"]), memory)
    assert updater.features(state) == after_select


def test_a_click_before_its_impression_waits_for_it() -> None:
    in_order = fold([impression("i1", T0), click("c1", T0 + 5, "a"), order("o1", T0 + 9, "b")])
    reordered = fold([order("o1", T0 + 9, "b"), click("c1", T0 + 5, "a"), impression("i1", T0)])
    assert_features_close(reordered, in_order)


def test_state_stays_bounded() -> None:
    settings = SETTINGS.with_overrides(seen_event_ids=10, remembered_impressions=3)
    updater, memory = PreferenceUpdater(settings), DictMemory()
    state = UserPreferenceState(user_id="u1")
    for index in range(50):
        updater.apply(state, impression(f"i{index}", T0 + index), memory)
    assert len(state.recent_event_ids) == 10
    assert sorted(memory) == ["i47", "i48", "i49"] == sorted(state.recent_impression_ids)
    assert state.totals["impressions"] == 50


def test_state_round_trips_through_bytes() -> None:
    updater, memory = PreferenceUpdater(SETTINGS), DictMemory()
    state = UserPreferenceState(user_id="u1")
    for event in (impression("i1", T0), click("c1", T0 + 1, "a")):
        updater.apply(state, event, memory)
    assert UserPreferenceState.from_bytes(state.to_bytes()) == state


def test_event_of_another_user_is_refused() -> None:
    with pytest.raises(ValueError, match="applied to the state"):
        PreferenceUpdater(SETTINGS).apply(UserPreferenceState(user_id="u2"), click("c1", T0, "a"), DictMemory())


# ------------------------------------------------------------------------------------- taste of u over rounds


def rounds_of(taste: Iterable[tuple[str, str]], rounds: int, copies: int = 1) -> list[AnyEvent]:
    """``rounds`` hourly rounds of the same behaviour (``copies`` impressions a round, each with clicks of the
    ``taste`` (kind, image) pairs): the same liked attributes at any volume."""
    events: list[AnyEvent] = []
    for number in range(rounds):
        for copy in range(copies):
            ts = T0 + 3600.0 * number  # the copies of a round at one time, so that they weigh the same
            impression_id = f"i{number}-{copy}"
            events.append(impression(impression_id, ts))
            for index, (kind, image_id) in enumerate(taste):
                make = click if kind == "click" else order
                events.append(make(f"{kind}{number}-{copy}-{index}", ts + 1, image_id, impression_id))
    return events


def u_of(events: Iterable[AnyEvent]) -> Any:
    return user_vector({**fold(events), "age_group": 2, "region": 1})


def test_first_and_later_rounds_with_the_same_liked_attributes_agree_on_the_taste_of_u() -> None:
    taste = [("click", "a"), ("order", "b")]
    first, fifth = u_of(rounds_of(taste, 1)), u_of(rounds_of(taste, 5))
    assert taste_part(first) == pytest.approx(taste_part(fifth), abs=1e-6)
    twice = u_of(rounds_of(taste, 1, copies=2))
    assert taste_part(first) == pytest.approx(taste_part(twice), abs=1e-6)
    assert first[USER_VECTOR_SLICES["preference"]] == pytest.approx(
        [(a + 3 * b) / 4 for a, b in zip(A, B, strict=True)]
    )
    # What was liked moves the taste; how much was done does not.
    other = u_of(rounds_of([("order", "a"), ("click", "b")], 1))
    assert taste_part(other) != pytest.approx(taste_part(first), abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_equals_batch_recomputation_in_any_order_with_duplicates(seed: int) -> None:
    events = TrafficSimulator(TrafficConfig(seed=seed, start_ts=T0, mean_gap_s=120.0)).events(300)
    noisy = events + random.Random(seed).sample(events, 60)  # duplicates
    random.Random(seed).shuffle(noisy)
    expected = reference_features(events, SETTINGS)
    updater, memory = PreferenceUpdater(SETTINGS), DictMemory()
    states: dict[str, UserPreferenceState] = {}
    for event in noisy:
        state = states.setdefault(event.user_id, UserPreferenceState(user_id=event.user_id))
        updater.apply(state, event, memory)
    assert set(states) == set(expected)
    for user_id, state in states.items():
        assert_features_close(updater.features(state), expected[user_id])
    merchants = [user_id for user_id in states if user_id.startswith("merchant-")]
    assert merchants and any(expected[m]["images_selected_total"] > 0 for m in merchants)


# ------------------------------------------------------------------------------------------------------ gate


def test_writing_gate_dead_letters_with_reason_and_original_bytes() -> None:
    letters: list[tuple[bytes, DeadLetter]] = []

    async def sink(key: bytes, letter: DeadLetter) -> None:
        letters.append((key, letter))

    gate = EventGate(sink, clock=lambda: T0)
    position = MessagePosition("perfusion.events", 3, 17)
    assert asyncio.run(gate.admit(b"{oops", position)) is None
    valid = click("c1", T0, "a")
    assert asyncio.run(gate.admit(valid.to_bytes(), position)) == valid
    [(key, letter)] = letters
    assert key == b"perfusion.events[3]@17"
    assert (letter.topic, letter.partition, letter.offset) == ("perfusion.events", 3, 17)
    assert letter.reason.startswith("not JSON")
    assert base64.b64decode(letter.original_b64) == b"{oops"
    assert gate.invalid_count == 1


def test_counting_gate_skips_without_dead_lettering() -> None:
    gate = EventGate(None, clock=lambda: T0)
    assert not gate.writes_dead_letters
    assert asyncio.run(gate.admit(b"[]", MessagePosition("t", 0, 0))) is None
    assert asyncio.run(gate.admit(None, MessagePosition("t", 0, 1))) is None
    assert gate.invalid_count == 2


# ----------------------------------------------------------------------------------------- Faust, in-process


class Crashes(list[tuple[str, BaseException]]):
    """Agents' crashes, recorded and raised again (the worker would end its process)."""

    def append_and_raise(self, task: str, exc: BaseException) -> NoReturn:
        self.append((task, exc))
        raise exc


def acknowledged() -> asyncio.Future[None]:
    """What a send returns once the broker has acknowledged it."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def test_agent_in_process_pushes_features_dedupes_and_dead_letters(tmp_path: Path) -> None:
    from streams.app import create_app

    events = TrafficSimulator(TrafficConfig(seed=5, start_ts=time.time() - 7200, mean_gap_s=30.0)).events(120)
    pushed: list[dict[str, Any]] = []
    letters: list[DeadLetter] = []

    pushed_so_far: set[str] = set()
    logged_before_its_push: list[str] = []

    async def feature_sink(rows: list[dict[str, Any]]) -> None:
        pushed.extend(rows)
        pushed_so_far.update(row["user_id"] for row in rows)

    settings = StreamSettings(
        bootstrap_servers="localhost:9", topic_prefix="inproc.", data_dir=tmp_path, push_batch_within_s=0.05
    )
    crashed = Crashes()
    # The events agent with the preference stage alone: the other stages would send to a broker.
    stream_app = create_app(
        settings,
        feature_sink=feature_sink,
        agent_modules=("streams.agents.events",),
        event_stage_modules=("streams.agents.preferences",),
        on_crash=crashed.append_and_raise,
    )

    async def send_to_dead_letters(key: bytes | None = None, value: bytes | None = None, **_: Any) -> asyncio.Future:
        assert value is not None
        letters.append(DeadLetter.model_validate_json(value))
        return acknowledged()

    stream_app.topics.dead_letters.send = send_to_dead_letters  # type: ignore[method-assign]
    logged: dict[str, dict[bytes, bytes | None]] = {"preference-users": {}, "preference-impressions": {}}
    for table_name, records in logged.items():

        async def log_change(
            key: bytes | None = None, value: bytes | None = None, records: dict = records, **_: Any
        ) -> asyncio.Future:
            assert key is not None
            records[key] = value
            if records is logged["preference-users"] and key.decode() not in pushed_so_far:
                logged_before_its_push.append(key.decode())
            return acknowledged()

        stream_app.app.tables[table_name].changelog_topic.send = log_change  # type: ignore[method-assign]
    malformed = [b"{not json", json.dumps({"kind": "click", "event_id": "x"}).encode()]

    async def drive() -> None:
        agent = stream_app.agents["streams.agents.events"]
        async with agent.test_context() as context:
            for event in events[:60]:
                await context.put(encode(event)[1], key=encode(event)[0])
            for raw in malformed:
                await context.put(raw, key=b"u")
            for event in events[:60] + events[60:]:  # the first half again: duplicates
                await context.put(encode(event)[1], key=encode(event)[0])
            await asyncio.sleep(0.5)

    asyncio.run(drive())
    assert crashed == []
    # Each pushed user's state reached its table's changelog before the batch was acknowledged.
    assert {key.decode() for key in logged["preference-users"]} == {row["user_id"] for row in pushed}
    assert logged["preference-impressions"], "no impression descriptors were logged"
    assert logged_before_its_push == [], "a state reached the changelog before Feast had its features"
    latest = {row["user_id"]: row for row in pushed}
    expected = reference_features(events, settings)
    assert set(latest) == set(expected)
    for user_id, row in latest.items():
        assert_features_close(row, expected[user_id])
        assert row["event_timestamp"].timestamp() == pytest.approx(row["last_active_ts"])
    # Merchants are viewers too: their selections reached their pushed preference.
    selecting = [row for user_id, row in latest.items() if user_id.startswith("merchant-")]
    assert any(row["images_selected_total"] > 0 and sum(row["preference"]) > 0 for row in selecting)
    assert [base64.b64decode(letter.original_b64) for letter in letters] == malformed
    assert "not JSON" in letters[0].reason and "ts" in letters[1].reason
    assert all(parse_event(encode(e)[1]) for e in events)  # the valid ones stay valid
