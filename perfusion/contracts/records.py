"""Typed records for everything that crosses Kafka.

Inbound events (what shoppers, merchants and the generator do) are pydantic models, validated strictly on the
way in by :func:`parse_event`; anything that fails goes to the dead-letter topic with the reason and the
original bytes. Outbound records (group samples and drops, production orders, training requests, model
updates) are pydantic models too, serialized as JSON with :meth:`to_bytes`.

Numbers are finite: NaN and infinities are refused when a record is built, in code or from the wire.

Schemas that evolve. Every record carries ``schema_version``, a major and a minor: on the wire the integer ``1``
(major 1, minor 0: what every writer of this code writes, :data:`SCHEMA_VERSION`) or the string ``"1.<minor>"``
(``"1.3"``). The rule (:data:`VERSION_RULE`):

- a *minor* version only adds optional fields (with a default) and never changes, removes or renames one, so a
  reader of major 1 reads every ``1`` and ``"1.<minor>"``, whatever the minor; a field it does not know is ignored
  when it reads from the wire (:func:`parse_event`, ``model_validate_json``): the record holds what this reader
  knows, and written again it is an event of this reader's version, ``1``;
- a new *major* changes what a field means or its type, or removes one: a reader refuses any other major with a
  reason that names this rule ("unknown schema_version ..."), and the worker dead-letters the event;
- a known field of the wrong type is refused as ever; when the event says it is of a newer minor than this reader,
  the reason adds that a minor never changes a known field (the writer needed a new major);
- a boolean, a number that is not an integer (``1.5``: ``1.10`` would read as ``1.1``) and a string that is not
  ``"<major>.<minor>"`` are not versions: refused;
- records built in code stay strict: an unknown keyword argument is an error (a typo never passes silently), and a
  new kind of event is refused by readers that do not know it (deploy readers before writers; what an older worker
  dead-lettered can be replayed, ``perfusion dlq replay``).

:func:`parse_event` reads untrusted bytes with bounds, so that no message can make it raise anything but
:class:`InvalidEvent`: at most :data:`MAX_EVENT_BYTES` bytes, JSON nested at most :data:`MAX_JSON_DEPTH` levels
(Python's decoder raises ``RecursionError`` on a few thousand), integers of at most :data:`MAX_INTEGER_DIGITS` digits
(``int()`` raises ``ValueError`` beyond 4,300 digits, and no field needs more than a few).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from perfusion.attributes import DESCRIPTOR_DIM

SCHEMA_VERSION: Final = 1
"""What writers write: major 1, minor 0, as the integer 1 (readers before this rule read only that)."""
SCHEMA_MAJOR: Final = 1
SCHEMA_MINOR: Final = 0
VERSION_RULE: Final = (
    f'this reader reads major {SCHEMA_MAJOR}: {SCHEMA_MAJOR} or "{SCHEMA_MAJOR}.<minor>" of any minor (a minor only '
    "adds optional fields; a new major changes or removes one)"
)
# "<major>.<minor>"; six digits each are more versions than a schema will ever have.
_VERSION_TEXT = re.compile(r"([0-9]{1,6})\.([0-9]{1,6})")
# A validation context key: read as from the wire (unknown fields ignored), though validated from Python objects.
FROM_THE_WIRE: Final = "from_the_wire"
# Events stamped further than this into the future (seconds, by the reader's clock) are rejected.
MAX_CLOCK_SKEW_S = 300.0
MAX_K = 16
# The service refuses bodies over 64 KiB; an impression of MAX_K candidates is about 12 KB of JSON.
MAX_EVENT_BYTES: Final = 64 * 1024
# An event is an object of candidates (objects) of descriptors (arrays): depth 4. Some room for what may come.
MAX_JSON_DEPTH: Final = 16
# Event time in milliseconds has 13 digits; quantities and thresholds fewer.
MAX_INTEGER_DIGITS: Final = 20

# Graded labels of a group sample: order > click > none. A returned order is graded down to a click; a
# merchant selection counts as a click-level positive.
GRADE_NONE = 0
GRADE_CLICK = 1
GRADE_ORDER = 2

NonEmptyId = Annotated[str, Field(min_length=1, max_length=128)]


def schema_version_parts(version: object) -> tuple[int, int] | None:
    """``(major, minor)`` of a wire ``schema_version`` (an integer major, or ``"<major>.<minor>"``), or None when
    it is not a version (a boolean, a float, another string)."""
    if type(version) is int:  # not a bool: True == 1 in Python, and a version is never a boolean
        return version, 0
    if isinstance(version, str):
        match = _VERSION_TEXT.fullmatch(version)
        if match is not None:
            return int(match[1]), int(match[2])
    return None


def version_refusal(version: object) -> str | None:
    """Why a reader of this code refuses ``version``, or None when it reads it."""
    parts = schema_version_parts(version)
    if parts is None:
        shape = 'an integer major, or "<major>.<minor>"'
        return f"unknown schema_version {version!r}: not a version ({shape}); {VERSION_RULE}"
    if parts[0] != SCHEMA_MAJOR:
        return f"unknown schema_version {version!r}: major {parts[0]} is incompatible; {VERSION_RULE}"
    return None


SchemaVersion = Annotated[
    Literal[1],
    WithJsonSchema(
        {
            "anyOf": [
                {"const": SCHEMA_VERSION, "type": "integer"},
                {"pattern": rf"^{SCHEMA_MAJOR}\.[0-9]{{1,6}}$", "type": "string"},
            ],
            "default": SCHEMA_VERSION,
            "description": f'{SCHEMA_VERSION}, or "{SCHEMA_MAJOR}.<minor>" of a newer minor; {VERSION_RULE}. '
            f"Written as {SCHEMA_VERSION}.",
        }
    ),
]
"""A compatible version on the wire; the record holds :data:`SCHEMA_VERSION`, the version of what it holds."""


@functools.cache
def _field_names(record_cls: type[BaseModel]) -> frozenset[str]:
    return frozenset(record_cls.model_fields)


class Record(BaseModel):
    """Base of every record: frozen, JSON on the wire. Unknown fields are refused in code and ignored on the wire;
    ``schema_version`` follows :data:`VERSION_RULE` (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    schema_version: SchemaVersion = SCHEMA_VERSION

    @field_validator("schema_version", mode="before")
    @classmethod
    def _compatible_version(cls, version: object) -> object:
        if isinstance(version, bool):  # Literal[1] takes True (True == 1 in Python); a version is never a boolean
            raise ValueError(f"schema_version must be an integer, got {version!r}")
        refusal = version_refusal(version)
        if refusal is not None:
            raise ValueError(refusal)
        return SCHEMA_VERSION  # what this record holds is of this reader's version, whatever minor wrote it

    @model_validator(mode="before")
    @classmethod
    def _ignore_unknown_fields_from_the_wire(cls, data: Any, info: ValidationInfo) -> Any:
        """From the wire (JSON, or :data:`FROM_THE_WIRE` in the context) a field this reader does not know is one
        of a newer minor: ignored. In code it is a mistake: refused (``extra="forbid"``)."""
        if not isinstance(data, dict) or not (info.mode == "json" or (info.context or {}).get(FROM_THE_WIRE)):
            return data
        known = _field_names(cls)
        if known.issuperset(data):  # runs for every record of every inbound event: a set test, not a loop
            return data
        return {name: value for name, value in data.items() if name in known}

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Event(Record):
    """Fields common to every inbound event."""

    event_id: NonEmptyId
    ts: float = Field(description="event time, seconds since the epoch (UTC)")
    user_id: NonEmptyId = Field(description="the acting user (shopper or merchant); the partition key")

    @field_validator("ts")
    @classmethod
    def _ts_is_plausible(cls, ts: float) -> float:
        if ts <= 0:
            raise ValueError(f"ts must be seconds since the epoch, got {ts}")
        return ts


class Candidate(Record):
    """One image of an impression group."""

    image_id: NonEmptyId
    position: int = Field(ge=0, lt=MAX_K, description="slot in the group as shown, 0 = first")
    descriptor: list[float] = Field(description=f"attribute probabilities, length {DESCRIPTOR_DIM}")

    @field_validator("descriptor")
    @classmethod
    def _descriptor_length(cls, descriptor: list[float]) -> list[float]:
        if len(descriptor) != DESCRIPTOR_DIM:
            raise ValueError(f"descriptor must have {DESCRIPTOR_DIM} values, got {len(descriptor)}")
        return descriptor


class DesignCreated(Event):
    """A merchant submitted a text design with the number of net orders at which production starts."""

    kind: Literal["design"] = "design"
    design_id: NonEmptyId
    prompt: Annotated[str, Field(min_length=1, max_length=300)]
    order_threshold: int = Field(ge=1, le=1_000_000)


class Impression(Event):
    """The generator showed a group of K candidate images of one design to one user."""

    kind: Literal["impression"] = "impression"
    design_id: NonEmptyId
    prompt: Annotated[str, Field(min_length=1, max_length=300)]
    model_version: NonEmptyId
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_K)

    @model_validator(mode="after")
    def _unique_slots(self) -> Impression:
        positions = [c.position for c in self.candidates]
        if len(set(positions)) != len(positions):
            raise ValueError(f"candidate positions must be unique, got {positions}")
        image_ids = [c.image_id for c in self.candidates]
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("candidate image_ids must be unique within an impression")
        return self


class Click(Event):
    kind: Literal["click"] = "click"
    impression_id: NonEmptyId
    design_id: NonEmptyId
    image_id: NonEmptyId


class Order(Event):
    """An order of one candidate; ``event_id`` is the order id that a later Return names."""

    kind: Literal["order"] = "order"
    impression_id: NonEmptyId
    design_id: NonEmptyId
    image_id: NonEmptyId
    quantity: int = Field(ge=1, le=1000)


class Return(Event):
    kind: Literal["return"] = "return"
    order_id: NonEmptyId = Field(description="event_id of the returned Order")
    impression_id: NonEmptyId
    design_id: NonEmptyId
    image_id: NonEmptyId
    quantity: int = Field(ge=1, le=1000)

    @classmethod
    def of_order(cls, order: Order, event_id: str, ts: float) -> Return:
        """The whole of ``order`` returned at ``ts``."""
        return cls(
            event_id=event_id,
            ts=ts,
            order_id=order.event_id,
            image_id=order.image_id,
            quantity=order.quantity,
            user_id=order.user_id,
            impression_id=order.impression_id,
            design_id=order.design_id,
        )


class Select(Event):
    """A merchant selected some candidates of an impression of their own design."""

    kind: Literal["select"] = "select"
    impression_id: NonEmptyId
    design_id: NonEmptyId
    image_ids: list[NonEmptyId] = Field(min_length=1, max_length=MAX_K)


AnyEvent = Annotated[
    DesignCreated | Impression | Click | Order | Return | Select,
    Field(discriminator="kind"),
]
_EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)


class InvalidEvent(ValueError):
    """Raised by :func:`parse_event`; ``reason`` is one line that says what is wrong and how to fix it."""

    MAX_REASON_CHARS: Final = 1000

    def __init__(self, reason: str) -> None:
        # One line, bounded: a reason quotes parts of the message (field names, values), which may hold anything.
        reason = reason.replace("\r", "\\r").replace("\n", "\\n")
        if len(reason) > self.MAX_REASON_CHARS:
            reason = reason[: self.MAX_REASON_CHARS - 3] + "..."
        super().__init__(reason)
        self.reason = reason


def parse_event(raw: bytes, now: float | None = None) -> AnyEvent:
    """Decode and validate one inbound event, or raise :class:`InvalidEvent` with a one-line reason; nothing else
    escapes, whatever ``raw`` holds."""
    payload = _bounded_json(raw)
    if not isinstance(payload, dict):
        raise InvalidEvent(f"an event must be a JSON object, got {type(payload).__name__}")
    version = payload.get("schema_version", SCHEMA_VERSION)
    refusal = version_refusal(version)
    if refusal is not None:
        raise InvalidEvent(refusal)
    try:
        event = _EVENT_ADAPTER.validate_python(payload, context={FROM_THE_WIRE: True})
    except ValidationError as exc:
        reason = validation_reason(exc)
        parts = schema_version_parts(version)
        if parts is not None and parts[1] > SCHEMA_MINOR:
            reason = (
                f"{reason[:600]} (schema_version {version!r}: a minor version only adds optional fields and never "
                "changes a known one; a changed field needs a new major)"
            )
        raise InvalidEvent(reason) from None
    now = time.time() if now is None else now
    if event.ts > now + MAX_CLOCK_SKEW_S:
        raise InvalidEvent(
            f"ts {event.ts:.3f} is {event.ts - now:.0f} s in the future (more than {MAX_CLOCK_SKEW_S:.0f} s); "
            "send event time in seconds since the epoch"
        )
    return event


# An impression of MAX_K candidates has 2 + 2 * MAX_K brackets; a message with more is looked at closely.
_BRACKETS_OF_THE_LARGEST_EVENT = 2 + 2 * MAX_K
# 19 digits in a row: maybe an integer beyond orjson's 64 bits (read as a float) or beyond MAX_INTEGER_DIGITS. Found
# by mapping every digit to "0" and every other byte to "." and searching for the run: a tenth of a regex's time.
_DIGITS_AS_ZEROS = bytes(ord("0") if ord("0") <= byte <= ord("9") else ord(".") for byte in range(256))
_LONG_DIGIT_RUN = b"0" * 19
# An escape pair, a quote or a bracket: all a scan of the nesting needs to see (escapes consumed whole, so an escaped
# quote never ends a string). No backtracking: linear in the message.
_NESTING_TOKEN = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)


def _nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in ``raw`` nest deeper than ``limit``, brackets inside strings not counted."""
    depth = 0
    in_string = False
    for match in _NESTING_TOKEN.finditer(raw):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _bounded_json(raw: bytes) -> object:
    """``json.loads`` within the bounds of :func:`parse_event`; every failure is an :class:`InvalidEvent`."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(raw)} bytes, more than {MAX_EVENT_BYTES}; an event is a small JSON object")
    if raw.count(b"[") + raw.count(b"{") > _BRACKETS_OF_THE_LARGEST_EVENT and _nested_deeper_than(raw, MAX_JSON_DEPTH):
        raise InvalidEvent(f"JSON nested deeper than {MAX_JSON_DEPTH} levels; an event is an object of a few levels")
    if _LONG_DIGIT_RUN not in raw.translate(_DIGITS_AS_ZEROS):
        # orjson, several times faster than json with a Python call per number, reads what it accepts exactly as
        # that does: finite floats only (no NaN or Infinity), strict UTF-8, and integers exactly up to 64 bits,
        # which a message without a run of 19 digits cannot exceed. What it refuses is read again below, so that a
        # refusal names its fault as it always has.
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return _exact_json(raw)


def _exact_json(raw: bytes) -> object:
    """``json.loads`` with every number checked by a Python call; every failure is an :class:`InvalidEvent`."""
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except InvalidEvent:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    except RecursionError:  # not reached within the depth bound; kept so that no input can raise it
        raise InvalidEvent("JSON nested too deeply to decode") from None
    except ValueError as exc:  # likewise for the integer bound (Python's own limit is 4,300 digits)
        raise InvalidEvent(f"not readable JSON: {exc}") from None


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise InvalidEvent(f"an integer of {digits} digits (more than {MAX_INTEGER_DIGITS}); no field needs one")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)  # a float of any length parses; too large gives inf, refused here
    if not math.isfinite(value):
        raise InvalidEvent(f"number {text[:40]} is out of range for a 64-bit float")
    return value


def _no_constant(text: str) -> float:
    raise InvalidEvent(f"{text} is not a number JSON allows; every number of an event is finite")


def validation_reason(exc: ValidationError, whole: str = "event") -> str:
    """A pydantic validation error as one line, ``field.path: message; ...`` (``whole`` names an error of the record
    as a whole)."""
    parts = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(part) for part in error["loc"]) or whole
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- outbound records


class DeadLetter(Record):
    """An inbound message that could not be used: why, where it was read, and the message itself.

    ``original_b64`` holds the original bytes (base64), or only their first bytes when the whole would not fit under
    the producer's request limit (``truncated``); ``original_sha256`` and ``original_size`` always describe the
    whole message, so that it can be found again and compared. ``key_b64`` and ``headers`` are the message's own.
    """

    reason: str
    original_b64: str
    topic: str
    partition: int
    offset: int
    ts: float
    original_size: int = 0
    original_sha256: str = ""
    truncated: bool = False
    key_b64: str | None = None
    # Lax: from JSON a pair is an array, which a strict tuple refuses once a validator has run on the record.
    headers: list[Annotated[tuple[str, str], Field(strict=False)]] = Field(
        default_factory=list, description="(name, value in base64) pairs"
    )


class GradedCandidate(Record):
    image_id: NonEmptyId
    position: int = Field(ge=0, lt=MAX_K)
    descriptor: list[float]
    grade: int = Field(ge=GRADE_NONE, le=GRADE_ORDER)


class GroupSample(Record):
    """One impression with its outcome: the comparative sample the trainer learns from.

    ``sample_id`` is the impression's event_id, so a replayed impression yields the same key downstream.
    """

    sample_id: NonEmptyId
    user_id: NonEmptyId
    design_id: NonEmptyId
    prompt: str
    model_version: NonEmptyId
    impression_ts: float
    candidates: list[GradedCandidate] = Field(min_length=1, max_length=MAX_K)


class GroupDrop(Record):
    """What ends without a group sample, with the reason.

    ``late_impression``: an impression that came after its window had closed; ``sample_id`` is its event_id, and
    it is keyed so downstream. ``orphan_follow_up``: follow-ups by ``user_id`` that named an impression ``sample_id``
    which that user was never shown in time (a shared link, an impression that never came); ``impression_ts`` is
    the earliest of those follow-ups and ``follow_ups`` how many there were. An orphan drop is keyed by
    ``<sample_id>/<user_id>`` downstream, since the impression named may have a sample of its own.
    """

    sample_id: NonEmptyId
    user_id: NonEmptyId
    design_id: NonEmptyId
    reason: Literal["late_impression", "orphan_follow_up"]
    impression_ts: float
    watermark: float
    follow_ups: int = Field(default=0, ge=0)

    def key(self) -> bytes:
        """The key of this drop on the drops topic."""
        if self.reason == "orphan_follow_up":
            return f"{self.sample_id}/{self.user_id}".encode()
        return self.sample_id.encode()


class ProductionOrder(Record):
    """A design reached its order threshold: make it. Emitted once per design; keyed by design_id."""

    design_id: NonEmptyId
    net_orders: int
    threshold: int
    ts: float


class DesignDemand(Record):
    """A design's demand as the worker's demand agent counts it, sent whenever one of these fields changes.

    Keyed by design_id on a compacted topic: the latest record of a design is its state, so a reader that keeps the
    latest per key (or reads the compacted topic from the start) knows every design's demand without folding the
    events. The content follows from the counter's state alone, so a record sent again after a crash is the same.
    """

    design_id: NonEmptyId
    net_orders: int = Field(description="units ordered less units returned (returns capped at their order)")
    peak_net_orders: int = Field(description="the most net orders the design has had; production fires on it")
    threshold: int | None = Field(description="net orders that start production; None = not known yet")
    threshold_reached: bool
    production_triggered: bool = Field(description="the design's ProductionOrder was sent and acknowledged")
    production_ts: float | None = Field(description="event time at which production fired; None = not yet")


class TrainRequest(Record):
    """Enough new group samples (or enough time) for a training update of ``model_version``."""

    request_id: NonEmptyId
    model_version: NonEmptyId
    new_samples: int
    reason: Literal["count", "timeout"]
    ts: float


class ModelUpdated(Record):
    """The trainer published a new model version; generators load it in place."""

    version: NonEmptyId
    path: str
    ts: float
    metrics: dict[str, float] = Field(default_factory=dict)
