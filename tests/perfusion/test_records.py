"""Inbound event records: each kind valid, each kind of malformation rejected with a reason; round trips."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfusion.attributes import DESCRIPTOR_DIM, Attributes
from perfusion.contracts.records import (
    MAX_CLOCK_SKEW_S,
    MAX_EVENT_BYTES,
    SCHEMA_VERSION,
    VERSION_RULE,
    AnyEvent,
    Candidate,
    Click,
    DeadLetter,
    DesignCreated,
    Impression,
    InvalidEvent,
    Order,
    ProductionOrder,
    Return,
    Select,
    parse_event,
)

NOW = 1_700_000_000.0
DESCRIPTOR = Attributes("dress", "navy", "striped", "long-sleeve", "slim").descriptor()


def candidate(position: int) -> dict[str, Any]:
    return {"image_id": f"img-{position}", "position": position, "descriptor": DESCRIPTOR}


VALID: dict[str, dict[str, Any]] = {
    "design": {
        "kind": "design", "event_id": "e1", "ts": NOW, "user_id": "m1", "design_id": "d1",
        "prompt": "a summer dress", "order_threshold": 10,
    },
    "impression": {
        "kind": "impression", "event_id": "e2", "ts": NOW, "user_id": "u1", "design_id": "d1",
        "prompt": "a summer dress", "model_version": "v1", "candidates": [candidate(0), candidate(1)],
    },
    "click": {
        "kind": "click", "event_id": "e3", "ts": NOW, "user_id": "u1", "impression_id": "e2", "design_id": "d1",
        "image_id": "img-0",
    },
    "order": {
        "kind": "order", "event_id": "e4", "ts": NOW, "user_id": "u1", "impression_id": "e2", "design_id": "d1",
        "image_id": "img-0", "quantity": 2,
    },
    "return": {
        "kind": "return", "event_id": "e5", "ts": NOW, "user_id": "u1", "order_id": "e4", "impression_id": "e2",
        "design_id": "d1", "image_id": "img-0", "quantity": 1,
    },
    "select": {
        "kind": "select", "event_id": "e6", "ts": NOW, "user_id": "m1", "impression_id": "e2", "design_id": "d1",
        "image_ids": ["img-1"],
    },
}  # fmt: skip
EXPECTED_TYPE = {
    "design": DesignCreated,
    "impression": Impression,
    "click": Click,
    "order": Order,
    "return": Return,
    "select": Select,
}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_event_of_each_kind_parses_to_its_record(kind: str) -> None:
    event = parse_event(encode(VALID[kind]), now=NOW)
    assert type(event) is EXPECTED_TYPE[kind]
    assert event.schema_version == 1
    assert parse_event(event.to_bytes(), now=NOW) == event


@pytest.mark.parametrize("kind", sorted(VALID))
@pytest.mark.parametrize("field", ["event_id", "ts", "user_id"])
def test_missing_common_field_is_rejected_naming_it(kind: str, field: str) -> None:
    payload = {k: v for k, v in VALID[kind].items() if k != field}
    with pytest.raises(InvalidEvent) as raised:
        parse_event(encode(payload), now=NOW)
    assert field in raised.value.reason


@pytest.mark.parametrize(
    ("kind", "field", "bad_value"),
    [
        ("click", "ts", "yesterday"),
        ("order", "quantity", "2"),
        ("order", "quantity", 0),
        ("impression", "candidates", []),
        ("select", "image_ids", "img-1"),
        ("design", "order_threshold", 1.5),
        ("click", "user_id", ""),
    ],
)
def test_wrong_typed_or_out_of_range_field_is_rejected_naming_it(kind: str, field: str, bad_value: object) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(encode({**VALID[kind], field: bad_value}), now=NOW)
    assert field in raised.value.reason


def test_not_json_is_rejected() -> None:
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_event(b"{not json", now=NOW)


def test_json_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(InvalidEvent, match="JSON object"):
        parse_event(b"[1, 2]", now=NOW)


def test_unknown_schema_version_is_rejected() -> None:
    with pytest.raises(InvalidEvent, match="schema_version 2"):
        parse_event(encode({**VALID["click"], "schema_version": 2}), now=NOW)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(InvalidEvent):
        parse_event(encode({**VALID["click"], "kind": "like"}), now=NOW)


# ------------------------------------------------------------------------------------- schemas that evolve


@pytest.mark.parametrize("kind", sorted(VALID))
def test_an_unknown_field_from_the_wire_is_ignored(kind: str) -> None:
    event = parse_event(encode({**VALID[kind], "colour": "red", "gift": {"wrap": True}}), now=NOW)
    assert event == parse_event(encode(VALID[kind]), now=NOW)
    assert b"colour" not in event.to_bytes()


def test_an_unknown_field_of_a_nested_record_is_ignored() -> None:
    candidates = [{**candidate(0), "aesthetic_score": 0.9}, candidate(1)]
    event = parse_event(encode({**VALID["impression"], "candidates": candidates}), now=NOW)
    assert event == parse_event(encode(VALID["impression"]), now=NOW)


def test_an_unknown_keyword_in_code_is_still_an_error() -> None:
    with pytest.raises(ValueError, match="colour"):
        Click(event_id="c", ts=NOW, user_id="u", impression_id="i", design_id="d", image_id="a", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="colour"):
        Click.model_validate({**VALID["click"], "colour": "red"})


@pytest.mark.parametrize("version", [1, "1.0", "1.1", "1.37", "1.999999"])
def test_every_minor_of_major_1_is_read_and_held_as_the_current_version(version: object) -> None:
    event = parse_event(encode({**VALID["order"], "schema_version": version}), now=NOW)
    assert event.schema_version == SCHEMA_VERSION == 1
    assert json.loads(event.to_bytes())["schema_version"] == 1  # written again, it is of this reader's version


@pytest.mark.parametrize("version", [2, 0, "2.0", "0.9", "3.1"])
def test_another_major_is_refused_naming_the_version_rule(version: object) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(encode({**VALID["click"], "schema_version": version}), now=NOW)
    assert raised.value.reason.startswith(f"unknown schema_version {version!r}: major ")
    assert VERSION_RULE in raised.value.reason


@pytest.mark.parametrize("version", [1.0, 1.5, "1", "v1.2", "1.x", "1.2.3", " 1.2", None, [1, 2]])
def test_what_is_not_a_version_is_refused_naming_the_rule(version: object) -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(encode({**VALID["click"], "schema_version": version}), now=NOW)
    assert "not a version" in raised.value.reason and VERSION_RULE in raised.value.reason


def test_a_known_field_of_the_wrong_type_in_a_newer_minor_is_refused_naming_the_rule() -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(encode({**VALID["order"], "schema_version": "1.4", "quantity": "2"}), now=NOW)
    assert raised.value.reason.startswith("order.quantity: Input should be a valid integer")
    assert "a minor version only adds optional fields and never changes a known one" in raised.value.reason


def test_outbound_records_read_from_json_follow_the_same_rule() -> None:
    order = ProductionOrder(design_id="d", net_orders=3, threshold=3, ts=NOW)
    newer = {**json.loads(order.to_bytes()), "schema_version": "1.2", "factory": "north"}
    assert ProductionOrder.model_validate_json(json.dumps(newer)) == order
    with pytest.raises(ValueError, match="major 2 is incompatible"):
        ProductionOrder.model_validate_json(json.dumps({**newer, "schema_version": "2.0"}))


def test_bounds_hold_inside_unknown_fields_too() -> None:
    click = {**VALID["click"], "schema_version": "1.1"}
    with pytest.raises(InvalidEvent, match="not a number JSON allows"):
        parse_event(encode(click).replace(b"}", b', "score": NaN}'), now=NOW)
    with pytest.raises(InvalidEvent, match="nested deeper than 16 levels"):
        parse_event(encode({**click, "tags": deep_list(40)}), now=NOW)
    with pytest.raises(InvalidEvent, match="integer of 30 digits"):
        parse_event(encode({**click, "big": int("9" * 30)}), now=NOW)
    with pytest.raises(InvalidEvent, match=f"more than {MAX_EVENT_BYTES}"):
        parse_event(encode({**click, "note": "x" * MAX_EVENT_BYTES}), now=NOW)


def deep_list(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_an_order_of_a_newer_minor_with_a_new_field_is_counted_and_the_next_major_is_dead_lettered() -> None:
    """In process, what the worker does with them: the admitted order counts towards its design's threshold; the
    event of major 2 goes to the dead-letter sink with the version rule as its reason."""
    from streams.dead_letters import EventGate, MessagePosition, original_bytes
    from streams.demand import DemandSettings, batch_production_orders

    design = {**VALID["design"], "order_threshold": 2}
    newer_order = {**VALID["order"], "schema_version": "1.1", "gift_wrap": True, "note": "for my sister"}
    next_major = {**VALID["order"], "event_id": "e9", "schema_version": "2.0", "quantity": {"units": 2}}
    letters: list[tuple[bytes, DeadLetter]] = []

    async def sink(key: bytes, letter: DeadLetter) -> None:
        letters.append((key, letter))

    gate = EventGate(sink, clock=lambda: NOW)

    async def admit_all() -> list[AnyEvent | None]:
        messages = [encode(design), encode(newer_order), encode(next_major)]
        return [await gate.admit(raw, MessagePosition("events", 0, n), key=b"u1") for n, raw in enumerate(messages)]

    admitted = asyncio.run(admit_all())
    assert admitted[2] is None
    events = [event for event in admitted if event is not None]
    [fired] = batch_production_orders(events, DemandSettings(allowed_lateness_s=0.0)).values()
    assert (fired.design_id, fired.net_orders) == ("d1", 2)  # the 1.1 order's two units crossed the threshold
    [(key, letter)] = letters
    assert key == b"events[0]@2" and original_bytes(letter) == encode(next_major)
    assert letter.reason.startswith("unknown schema_version '2.0': major 2 is incompatible") and VERSION_RULE in (
        letter.reason
    )


def test_far_future_ts_is_rejected_but_small_skew_is_accepted() -> None:
    assert parse_event(encode({**VALID["click"], "ts": NOW + MAX_CLOCK_SKEW_S - 1}), now=NOW).ts > NOW
    with pytest.raises(InvalidEvent, match="in the future"):
        parse_event(encode({**VALID["click"], "ts": NOW + 10 * 86_400}), now=NOW)


def test_impression_with_duplicate_positions_or_short_descriptor_is_rejected() -> None:
    twice = {**VALID["impression"], "candidates": [candidate(0), {**candidate(1), "position": 0}]}
    with pytest.raises(InvalidEvent, match="positions must be unique"):
        parse_event(encode(twice), now=NOW)
    short = {**VALID["impression"], "candidates": [{**candidate(0), "descriptor": [0.5] * (DESCRIPTOR_DIM - 1)}]}
    with pytest.raises(InvalidEvent, match=f"{DESCRIPTOR_DIM} values"):
        parse_event(encode(short), now=NOW)


ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(event_id=ids, user_id=ids, ts=st.floats(min_value=1.0, max_value=NOW), quantity=st.integers(1, 1000))
def test_any_valid_order_round_trips_through_bytes(event_id: str, user_id: str, ts: float, quantity: int) -> None:
    order = Order(
        event_id=event_id, ts=ts, user_id=user_id, impression_id="i", design_id="d", image_id="x", quantity=quantity
    )
    assert parse_event(order.to_bytes(), now=NOW) == order


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_either_parse_or_raise_invalid_event(raw: bytes) -> None:
    try:
        parse_event(raw, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason and "\n" not in exc.reason


def test_json_nested_thousands_of_levels_deep_is_rejected_not_a_recursion_error() -> None:
    deep = b'{"kind": "click", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(InvalidEvent, match="nested deeper than 16 levels"):
        parse_event(deep, now=NOW)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    prompt = "[[[[{{{{" * 30 + '\\"]]'  # brackets, an escaped backslash and a quote inside the prompt
    payload = {**VALID["design"], "prompt": prompt}
    assert parse_event(encode(payload), now=NOW).prompt == prompt  # type: ignore[union-attr]


def test_an_integer_of_5000_digits_is_rejected_not_a_value_error() -> None:
    raw = encode(VALID["order"]).replace(b'"quantity": 2', b'"quantity": ' + b"7" * 5000)
    with pytest.raises(InvalidEvent, match="integer of 5000 digits"):
        parse_event(raw, now=NOW)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_rejected_at_parsing(constant: bytes) -> None:
    raw = encode(VALID["click"]).replace(f'"ts": {NOW}'.encode(), b'"ts": ' + constant)
    with pytest.raises(InvalidEvent, match=r"not a number JSON allows|out of range"):
        parse_event(raw, now=NOW)


def test_records_built_in_code_refuse_nan_and_infinite_values() -> None:
    with pytest.raises(ValueError, match="finite number"):
        Candidate(image_id="a", position=0, descriptor=[float("nan")] * DESCRIPTOR_DIM)
    with pytest.raises(ValueError, match="finite number"):
        Click(event_id="c", ts=float("inf"), user_id="u", impression_id="i", design_id="d", image_id="a")


def test_a_boolean_is_not_a_schema_version() -> None:
    with pytest.raises(InvalidEvent, match="schema_version True"):
        parse_event(encode({**VALID["click"], "schema_version": True}), now=NOW)
    with pytest.raises(ValueError, match="schema_version must be an integer"):
        Click.model_validate({**VALID["click"], "schema_version": True})


def test_a_message_over_the_size_limit_is_rejected_before_decoding() -> None:
    raw = encode({**VALID["click"], "padding": "x" * MAX_EVENT_BYTES})
    with pytest.raises(InvalidEvent, match=f"more than {MAX_EVENT_BYTES}"):
        parse_event(raw, now=NOW)


def test_the_largest_valid_impression_fits_every_bound() -> None:
    candidates = [{**candidate(k), "image_id": "i" * 120 + str(k)} for k in range(16)]
    payload = {**VALID["impression"], "prompt": "p" * 300, "candidates": candidates}
    assert len(parse_event(encode(payload), now=NOW).candidates) == 16  # type: ignore[union-attr]


hostile_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(VALID)), field=st.text(max_size=12), value=hostile_json)
def test_any_json_value_in_any_field_parses_or_raises_invalid_event(kind: str, field: str, value: object) -> None:
    payload = {**VALID[kind], (field or "ts"): value}
    try:
        event = parse_event(json.dumps(payload).encode(), now=NOW)
    except InvalidEvent as exc:
        assert exc.reason and "\n" not in exc.reason
    else:
        assert parse_event(event.to_bytes(), now=NOW) == event


def test_dead_letter_is_a_frozen_record() -> None:
    letter = DeadLetter(reason="r", original_b64="", topic="t", partition=0, offset=1, ts=NOW)
    assert DeadLetter.model_validate_json(letter.to_bytes()) == letter
    with pytest.raises(ValueError):
        letter.reason = "other"  # type: ignore[misc]


_WIRE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**22), 10**22) | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)


def _read(read: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "value", read(raw)
    except InvalidEvent as exc:
        return "refused", str(exc)


@settings(max_examples=400)
@given(
    st.one_of(
        st.tuples(_WIRE_VALUES, st.booleans()).map(
            lambda case: json.dumps(case[0], ensure_ascii=case[1]).encode("utf-8", "surrogatepass")
        ),
        st.binary(max_size=40),
        st.sampled_from([b"1e400", b'"\\ud800"', b"\xef\xbb\xbf{}", b"[NaN]", b"-9223372036854775809", b"1" * 25]),
    )
)
def test_the_fast_json_read_gives_what_the_exact_read_gives_or_refuses_it_the_same_way(raw: bytes) -> None:
    from perfusion.contracts.records import _bounded_json, _exact_json

    fast, exact = _read(_bounded_json, raw), _read(_exact_json, raw)
    assert fast[0] == exact[0]
    if fast[0] == "value":
        assert json.dumps(fast[1]) == json.dumps(exact[1])  # the same types and values (a float stays a float)
    else:
        assert fast[1] == exact[1]
