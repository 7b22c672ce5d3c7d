"""Bounded decoding of a posted event's JSON, so that no body can make ``POST /events`` fail with a 5xx.

``json.loads`` alone lets three kinds of input escape as errors that are not about a field: nesting a few thousand
levels deep (``RecursionError``), an integer of more than 4,300 digits (``ValueError``, Python's limit on int
conversion), and numbers that are not finite (``NaN``, ``Infinity``, ``1e999``), which decode fine and then poison
the worker's arithmetic. A lone surrogate escape (``"\\ud800"``) decodes to a string that cannot be encoded again
when the event is produced. :func:`check_event_body` decodes under limits that no valid event comes near and raises
:class:`EventBodyRefused` with a reason that names the field. It also refuses a boolean ``schema_version``:
``true == 1`` in Python, and a version is a number.

The records read from Kafka tolerate what a newer writer adds (fields they do not know, any minor of their major);
a client of this service is held to the schema itself: a field its event's kind does not have, and any
``schema_version`` but the current one, are refused here. What the service produces is always of the current
version.

The body is then validated as an event by ``perfusion.contracts.records.parse_event``, which decodes it again;
after this check that second decoding cannot raise anything but its own ``InvalidEvent``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from perfusion.contracts.records import SCHEMA_VERSION, Click, DesignCreated, Impression, Order, Return, Select

# The deepest valid posted event is a Select: {"image_ids": ["..."]}, two levels; impressions (four levels) are
# produced by the service, never posted.
MAX_NESTING = 8
# Ids are strings; the only numbers are quantities (at most 1000), seeds (< 2**63: 19 digits) and timestamps.
MAX_INTEGER_DIGITS = 20

# The fields of each kind of event; the kind itself is checked by the records' validation.
_FIELDS_OF_KIND: dict[str, frozenset[str]] = {
    str(record.model_fields["kind"].default): frozenset(record.model_fields)
    for record in (DesignCreated, Impression, Click, Order, Return, Select)
}

# A JSON string (with escapes) or one structural character; used to measure nesting without recursion.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


class EventBodyRefused(ValueError):
    """The body cannot be an event; ``reason`` is one line, starting with the field when there is one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused:
    """Stands in the decoded JSON for a number that was refused, so the walk can say in which field it was."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def check_event_body(raw: bytes) -> dict[str, Any]:
    """The body decoded as a JSON object, or :class:`EventBodyRefused` naming the field that is out of bounds."""
    _check_nesting(raw)
    try:
        payload = json.loads(
            raw, parse_int=_bounded_integer, parse_float=_finite_float, parse_constant=_refused_constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventBodyRefused(f"body: not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise EventBodyRefused(f"body: an event must be a JSON object, got {type(payload).__name__}")
    refusal = _first_refusal(payload, ())
    if refusal is not None:
        path, reason = refusal
        raise EventBodyRefused(f"{'.'.join(path)}: {reason}")
    if isinstance(payload.get("schema_version"), bool):
        raise EventBodyRefused(
            f"schema_version: {json.dumps(payload['schema_version'])} is a boolean, not a version; send 1"
        )
    _check_schema(payload)
    return payload


def _check_schema(payload: dict[str, Any]) -> None:
    """Strict at the edge: the current version only, and no field that the event's kind does not have."""
    version = payload.get("schema_version", SCHEMA_VERSION)
    if type(version) is not int or version != SCHEMA_VERSION:
        shown = json.dumps(version)
        shown = shown if len(shown) <= 30 else f"{shown[:27]}..."
        raise EventBodyRefused(
            f"schema_version: {shown} is not the version this service takes; send {SCHEMA_VERSION} or leave it out"
        )
    kind = payload.get("kind")
    fields = _FIELDS_OF_KIND.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return  # an unknown or missing kind is refused by the records' validation, naming the kinds
    unknown = [name for name in payload if name not in fields]
    if unknown:
        name = unknown[0] if len(unknown[0]) <= 60 else f"{unknown[0][:57]}..."
        raise EventBodyRefused(
            f"{name}: a {kind} event has no such field; send only its fields ({', '.join(sorted(fields))})"
        )


def _check_nesting(raw: bytes) -> None:
    depth = 0
    field = "body"
    last_string: bytes | None = None
    for match in _TOKEN.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_NESTING:
                raise EventBodyRefused(f"{field}: JSON nested more than {MAX_NESTING} levels deep")
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b":" and depth == 1 and last_string is not None:
            field = _field_name(last_string)
        last_string = token if token.startswith(b'"') else None


def _field_name(quoted: bytes) -> str:
    try:
        name = json.loads(quoted)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "body"
    text = str(name)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _bounded_integer(digits: str) -> int | _Refused:
    significant = len(digits.lstrip("-"))
    if significant > MAX_INTEGER_DIGITS:
        return _Refused(f"an integer of {significant} digits; at most {MAX_INTEGER_DIGITS} are accepted")
    return int(digits)


def _finite_float(text: str) -> float | _Refused:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 30 else f"{text[:27]}..."
        return _Refused(f"{shown} is beyond the range of a float; send a finite number")
    return value


def _refused_constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a finite number; send a finite number")


def _first_refusal(value: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """The path and reason of the first refused number under ``value`` (depth is bounded by the nesting check)."""
    if isinstance(value, _Refused):
        return (path or ("body",)), value.reason
    if isinstance(value, str):
        return (
            None
            if _encodable(value)
            else ((path or ("body",)), "a lone surrogate escape (\\ud800-\\udfff); send UTF-8 text")
        )
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if isinstance(key, str) and not _encodable(key):
            return (*path, "?"), "a field name with a lone surrogate escape; send UTF-8 text"
        found = _first_refusal(child, (*path, str(key)))
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The kinds a client posts to /events (designs come through POST /designs, impressions only from the service).
POSTED_EVENT_RECORDS = (Click, Order, Return, Select)
SERVER_ASSIGNED = ("event_id", "ts")  # left out, the service assigns them
# Left out by a shopper or a merchant, it is the caller's own id; the order system must name the shopper (422).
CALLER_DEFAULTED = ("user_id",)


def posted_event_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of each posted kind as this edge accepts it, by component name (``ClickEvent``, ...): the
    record's schema with ``kind`` required, ``event_id``, ``ts`` and ``user_id`` optional, the current
    ``schema_version`` only, no other fields."""
    schemas = {}
    for record in POSTED_EVENT_RECORDS:
        schema = record.model_json_schema(ref_template="#/components/schemas/{model}")
        optional = (*SERVER_ASSIGNED, *CALLER_DEFAULTED)
        schema["required"] = ["kind", *(name for name in schema.get("required", []) if name not in optional)]
        schema["properties"]["schema_version"] = {"const": SCHEMA_VERSION, "default": SCHEMA_VERSION}
        schema["additionalProperties"] = False
        schemas[f"{record.__name__}Event"] = schema
    return schemas


def posted_event_request_body() -> dict[str, Any]:
    """The /events request body for OpenAPI: one of the posted kinds, told apart by ``kind``."""
    refs = {
        str(record.model_fields["kind"].default): f"#/components/schemas/{record.__name__}Event"
        for record in POSTED_EVENT_RECORDS
    }
    schema = {
        "oneOf": [{"$ref": ref} for ref in refs.values()],
        "discriminator": {"propertyName": "kind", "mapping": refs},
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
