"""tests/service/openapi_fuzz.py on a tiny hand-written OpenAPI document: a $ref, a oneOf told apart by a
discriminator, bounds and required fields. Valid draws are checked against the schema by hand, field by field, and
each kind of broken value is checked to break what it says it breaks."""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from tests.service.openapi_fuzz import (
    CONTROL_CHARACTERS,
    DEEP_NESTING,
    HOSTILE_PATH_VALUES,
    NON_FINITE_TOKENS,
    Broken,
    RawToken,
    Request,
    SchemaStrategies,
    encode_json,
    json_type,
    operations,
)

THING: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
        "count": {"type": "integer", "minimum": 1, "maximum": 10},
        "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 2.5},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "note": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
    },
    "required": ["name", "count"],
    "additionalProperties": False,
}
CAT: dict[str, Any] = {
    "type": "object",
    "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["kind", "lives"],
    "additionalProperties": False,
}
DOG: dict[str, Any] = {
    "type": "object",
    "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
    "required": ["kind", "good"],
    "additionalProperties": False,
}
ANIMAL: dict[str, Any] = {
    "oneOf": [{"$ref": "#/components/schemas/Cat"}, {"$ref": "#/components/schemas/Dog"}],
    "discriminator": {
        "propertyName": "kind",
        "mapping": {"cat": "#/components/schemas/Cat", "dog": "#/components/schemas/Dog"},
    },
}
DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "paths": {
        "/things/{thing_id}": {
            "post": {
                "parameters": [
                    {"name": "thing_id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 8}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 5}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}},
                },
                "security": [{"ApiKey": []}],
            }
        },
        "/animals": {
            "get": {},
            "put": {"requestBody": {"required": True, "content": {"application/json": {"schema": ANIMAL}}}},
        },
    },
    "components": {"schemas": {"Thing": THING, "Cat": CAT, "Dog": DOG}},
}
THING_REF: dict[str, Any] = {"$ref": "#/components/schemas/Thing"}
# The JSON types each property of a Thing may have (integer is a number too).
THING_TYPES = {
    "name": {"string"},
    "count": {"integer"},
    "weight": {"number", "integer"},
    "tags": {"array"},
    "note": {"string", "null"},
}
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# find() without shrinking: the first example found is enough, and shrinking is most of its time.
FIND = settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate])
strategies = SchemaStrategies(DOCUMENT)


def is_valid_thing(value: Any) -> bool:
    """A Thing by its schema, checked keyword by keyword."""
    assert isinstance(value, dict) and {"name", "count"} <= set(value) <= set(THING["properties"])
    assert isinstance(value["name"], str) and 2 <= len(value["name"]) <= 5 and re.search("^[a-z]+$", value["name"])
    assert type(value["count"]) is int and 1 <= value["count"] <= 10
    if "weight" in value:
        assert isinstance(value["weight"], float | int) and not isinstance(value["weight"], bool)
        assert 0 < value["weight"] <= 2.5 and math.isfinite(value["weight"])
    if "tags" in value:
        assert isinstance(value["tags"], list) and 1 <= len(value["tags"]) <= 3
        assert all(tag in ("a", "b") for tag in value["tags"])
    if "note" in value:
        assert value["note"] is None or (isinstance(value["note"], str) and len(value["note"]) <= 3)
    return True


def test_operations_are_every_method_of_every_path() -> None:
    found = {operation.key: operation for operation in operations(DOCUMENT)}
    assert set(found) == {"POST /things/{thing_id}", "GET /animals", "PUT /animals"}
    post = found["POST /things/{thing_id}"]
    assert [(p.name, p.location, p.required) for p in post.parameters] == [
        ("thing_id", "path", True),
        ("limit", "query", False),
    ]
    assert post.body == THING_REF and post.body_required and post.secured
    assert found["GET /animals"].body is None and not found["GET /animals"].secured
    assert found["PUT /animals"].body == ANIMAL


def test_a_ref_is_resolved_to_its_component() -> None:
    assert strategies.resolve(THING_REF) is THING
    assert strategies.allowed_types(THING_REF) == {"object"}
    assert strategies.allowed_types(THING["properties"]["note"]) == {"string", "null"}


@EXAMPLES
@given(strategies.valid(THING_REF))
def test_a_valid_draw_has_every_required_field_within_its_bounds(value: Any) -> None:
    assert is_valid_thing(value)


@EXAMPLES
@given(strategies.valid({"$ref": "#/components/schemas/Cat"}))
def test_a_valid_draw_of_a_branch_has_its_const(value: Any) -> None:
    assert set(value) == {"kind", "lives"} and value["kind"] == "cat"
    assert type(value["lives"]) is int and 0 <= value["lives"] <= 9


@EXAMPLES
@given(strategies.valid(ANIMAL))
def test_a_valid_draw_of_the_union_is_one_branch_by_its_discriminator(value: Any) -> None:
    assert value["kind"] in ("cat", "dog")
    if value["kind"] == "cat":
        assert set(value) == {"kind", "lives"} and type(value["lives"]) is int and 0 <= value["lives"] <= 9
    else:
        assert set(value) == {"kind", "good"} and isinstance(value["good"], bool)


def test_every_branch_of_the_union_and_the_bounds_are_drawn() -> None:
    assert find(strategies.valid(ANIMAL), lambda v: v["kind"] == "dog", settings=FIND)["good"] in (True, False)
    assert find(strategies.valid(ANIMAL), lambda v: v["kind"] == "cat", settings=FIND)["lives"] in range(10)
    assert find(strategies.valid(THING_REF), lambda v: v["count"] == 10, settings=FIND)["count"] == 10
    assert len(find(strategies.valid(THING_REF), lambda v: len(v["name"]) == 5, settings=FIND)["name"]) == 5


def test_known_strings_and_field_strategies_are_drawn_where_they_fit() -> None:
    hinted = SchemaStrategies(DOCUMENT, strings=("abc", "TOO-LONG-FOR-A-NAME"), fields={"count": st.just(7)})
    assert find(hinted.valid(THING_REF), lambda v: v["name"] == "abc", settings=FIND)["name"] == "abc"
    assert find(hinted.valid(THING_REF), lambda v: v["count"] == 7, settings=FIND)["count"] == 7
    misfits = SchemaStrategies(DOCUMENT, strings=("TOO-LONG-FOR-A-NAME",), fields={"count": st.just(11)})

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(misfits.valid(THING_REF))
    def never_out_of_the_schema(value: Any) -> None:
        assert is_valid_thing(value)

    never_out_of_the_schema()


def value_at(value: Any, at: tuple[str | int, ...]) -> Any:
    for step in at:
        value = value[step]
    return value


def breaks_what_it_says(broken: Broken) -> bool:
    """Whether a broken Thing breaks it the way ``broken.kind`` says, at ``broken.at``."""
    value, at = broken.value, broken.at
    if not at:  # the body itself
        assert broken.kind in ("wrong-type", "deep-nesting")
        if broken.kind == "deep-nesting":
            assert isinstance(value, RawToken) and value.text.startswith("[" * DEEP_NESTING)
        else:
            assert json_type(value) != "object"
        return True
    name, *inner = at
    assert isinstance(value, dict) and isinstance(name, str)
    if broken.kind == "missing-required":
        assert not inner and name in THING["required"] and name not in value
        return True
    if broken.kind == "unknown-field":
        assert not inner and name in value and name not in THING["properties"]
        return True
    field = value_at(value, at)
    # Only the broken field is off: every other one is as the schema says.
    rest = {k: v for k, v in value.items() if k != name}
    assert is_valid_thing({"name": "ok", "count": 1, **rest})
    if broken.kind == "wrong-type":
        allowed = THING_TYPES[name] if not inner else {"string"}  # a tag is a string
        assert json_type(field) not in allowed
    elif broken.kind == "out-of-bounds":
        if name == "name":
            assert not 2 <= len(field) <= 5
        elif name == "count":
            assert type(field) is int and not 1 <= field <= 10
        elif name == "weight":
            assert not 0 < field <= 2.5
        elif name == "tags":
            assert not 1 <= len(field) <= 3
        else:
            assert name == "note" and len(field) > 3
    elif broken.kind == "non-finite":
        assert name in ("count", "weight") and isinstance(field, RawToken) and field.text in NON_FINITE_TOKENS
    elif broken.kind == "control-characters":
        assert name in ("name", "note") or inner
        if isinstance(field, RawToken):  # a lone surrogate escape
            assert field.text.endswith('\\ud800"') and json_type(json.loads(field.text)) == "string"
        else:
            assert any(c in CONTROL_CHARACTERS for c in field)
    elif broken.kind == "outside-enum":
        assert name == "tags" and inner and field not in ("a", "b")
    else:
        assert broken.kind == "deep-nesting" and isinstance(field, RawToken)
        assert field.text.count("[") >= DEEP_NESTING
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.broken(THING_REF))
def test_each_broken_value_breaks_what_it_says(broken: Broken) -> None:
    assert breaks_what_it_says(broken)


def of_kind(kind: str) -> Callable[[Broken], bool]:
    return lambda broken: broken.kind == kind


def test_every_kind_of_break_is_drawn() -> None:
    properties = THING["properties"]
    where = {
        "missing-required": THING_REF,
        "unknown-field": THING_REF,
        "wrong-type": THING_REF,
        "deep-nesting": THING_REF,
        "out-of-bounds": properties["count"],
        "non-finite": properties["weight"],
        "control-characters": properties["name"],
        "outside-enum": properties["tags"]["items"],
    }
    for kind, schema in where.items():
        assert find(strategies.broken(schema), of_kind(kind), settings=FIND).kind == kind
    dropped = find(
        strategies.broken(THING_REF), lambda b: b.kind == "missing-required" and b.at == ("count",), settings=FIND
    )
    assert "count" not in dropped.value and "name" in dropped.value
    too_many = find(strategies.broken(properties["count"]), lambda b: b.kind == "out-of-bounds", settings=FIND)
    assert type(too_many.value) is int and not 1 <= too_many.value <= 10
    item = find(strategies.broken(properties["tags"]), lambda b: len(b.at) == 1, settings=FIND)
    assert isinstance(item.at[0], int) and item.value[item.at[0]] not in ("a", "b")


def test_the_union_is_broken_by_a_tag_no_branch_has() -> None:
    broken = find(strategies.broken(ANIMAL), lambda b: b.kind == "outside-enum" and b.at == ("kind",), settings=FIND)
    assert broken.value["kind"] not in ("cat", "dog")

    @settings(max_examples=60, deadline=None)
    @given(strategies.broken(ANIMAL))
    def never_a_tag_of_another_branch(broken: Broken) -> None:
        if broken.at == ("kind",) and broken.kind == "outside-enum":
            assert broken.value["kind"] not in ("cat", "dog")

    never_a_tag_of_another_branch()


def test_non_finite_numbers_and_raw_tokens_are_written_as_json_tokens() -> None:
    body = {"a": float("nan"), "b": [float("inf"), -float("inf")], "c": RawToken("1e999"), "d": "é"}
    assert encode_json(body) == b'{"a":NaN,"b":[Infinity,-Infinity],"c":1e999,"d":"\\u00e9"}'
    assert json.loads(encode_json({"a": [1, {"b": None}]})) == {"a": [1, {"b": None}]}
    surrogate = encode_json(RawToken('"x\\ud800"'))
    assert surrogate == b'"x\\ud800"'


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies.requests(operations(DOCUMENT)[0]))
def test_a_request_fills_its_path_and_says_what_breaks_the_schema(request: Request) -> None:
    thing_id = request.path_values["thing_id"]
    assert request.path == "/things/" + urllib.parse.quote(thing_id, safe="")
    assert request.body is not None
    breaks_path = [reason for reason in request.breaks if reason.startswith("path thing_id")]
    if not breaks_path:
        assert len(thing_id) <= 8
    if thing_id in HOSTILE_PATH_VALUES and len(thing_id) > 8:
        assert breaks_path
    if "limit" in request.query and not any(r.startswith("query limit") for r in request.breaks):
        assert 1 <= int(request.query["limit"]) <= 5
    if not any(reason.startswith("body") for reason in request.breaks):
        assert is_valid_thing(json.loads(request.body))


def test_requests_draw_hostile_path_values_broken_bodies_and_hostile_bodies() -> None:
    draws = strategies.requests(operations(DOCUMENT)[0], hostile_bodies=st.just([1, 2]))
    assert (
        find(draws, lambda r: "path thing_id: hostile" in r.breaks, settings=FIND).path_values["thing_id"]
        in HOSTILE_PATH_VALUES
    )
    assert find(draws, lambda r: "body: hostile" in r.breaks, settings=FIND).body == b"[1,2]"
    assert find(draws, lambda r: any(b.startswith("body count") for b in r.breaks), settings=FIND).body
    bodiless = find(strategies.requests(operations(DOCUMENT)[1]), lambda r: True, settings=FIND)
    assert bodiless.body is None and bodiless.path == "/animals"
