"""Attribution windows in event time: one impression plus what followed it becomes one graded group sample.

An :class:`~perfusion.contracts.records.Impression` opens a group. Clicks, orders, returns and selections by the user
who was shown it that name its ``impression_id`` and carry an event time within ``window_s`` of the impression are
attributed to it (a follow-up by anyone else, such as a friend who opened a shared link, is not that viewer's
choice: it waits as an orphan and ends as a counted drop). A viewer is a shopper or a merchant: a merchant shown a
group of their own design is its viewer, so their selection grades their own sample (the selected candidates
``GRADE_CLICK``, the others ``GRADE_NONE``), and the sample carries the merchant's ``user_id``, from which the
trainer builds the merchant's u; it never grades a shopper's group. The group closes once the partition's watermark
(the largest event time seen on the partition less ``allowed_lateness_s``) has passed ``impression.ts + window_s``;
closing emits one :class:`~perfusion.contracts.records.GroupSample` whose ``sample_id`` is the impression's
event_id.

Policy, so that every impression ends as exactly one sample or one counted drop:

- an impression seen again while its group is open or remembered as closed is a duplicate: counted, no output;
- an impression whose window the watermark has already passed arrives too late to be attributed fairly: it ends
  as a :class:`~perfusion.contracts.records.GroupDrop` with reason ``late_impression``;
- a follow-up for an impression not seen yet (by its user) is buffered, at most ``max_pending_follow_ups`` per
  impression and ``max_pending_impressions`` impressions per partition (beyond that it is counted as
  ``orphan_overflow``); the buffer expires once no impression that could own it can still arrive in time, as one
  :class:`~perfusion.contracts.records.GroupDrop` with reason ``orphan_follow_up`` (each event counted too);
- a group whose stored state cannot be read back is counted as ``unreadable_group`` and forgotten, so that one bad
  state never stops the partition;
- a follow-up for a closed group is counted as ``late_follow_up``; one stamped after its group's window is counted
  as ``outside_window``; one seen twice (same event_id) as ``duplicate_follow_up``; none of these change a sample;
- a worker that stops leaves open groups in the store; the next owner of the partition resumes them;
- a partition that receives no events for ``idle_after_s`` wall-clock seconds is idle: its watermark moves on with
  the wall clock (:func:`idle_watermark`), so the last groups of a quiet partition close too. An event that arrives
  afterwards stamped behind that watermark is late and handled by the rules above.

Delivery is two-phase so that a crash never loses an output: closing stores the output in the group's state
(``closing``) before returning it; the caller sends it and then calls :meth:`GroupBuilder.confirm`, which shrinks
the state to a ``closed`` marker. A builder that finds ``closing`` groups in the store (a crash between the two)
returns their outputs again from its next :meth:`GroupBuilder.process`: a replay may repeat a sample, always under
the same ``sample_id``, and never drops one.

Grades are computed when the group closes, from the set of attributed events, so they do not depend on arrival
order: an order whose quantity was not fully returned grades its image ``GRADE_ORDER``; a click, a selection or a
fully returned order grades it ``GRADE_CLICK``; anything else stays ``GRADE_NONE``.

State lives in a ``MutableMapping`` (a changelog-backed Faust table in the worker, a dict in tests) under keys
``i:<partition>:<viewer>:<impression_id>`` (:func:`impression_key`) and ``w:<partition>``; values are JSON-compatible
so that a restarted worker reads back exactly what it wrote. Every key names the partition that owns it: builders of
different partitions share a store (one table) but never a key, so no event, however keyed, makes one partition read
or change another's group. One :class:`GroupBuilder` serves one partition; its due-time index is rebuilt from the
store.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Iterable, MutableMapping
from typing import Any

from pydantic import Field

from perfusion.contracts.records import (
    GRADE_CLICK,
    GRADE_NONE,
    GRADE_ORDER,
    AnyEvent,
    Click,
    DesignCreated,
    GradedCandidate,
    GroupDrop,
    GroupSample,
    Impression,
    Order,
    Return,
    Select,
)
from perfusion.settings import Settings

log = logging.getLogger(__name__)

FollowUp = Click | Order | Return | Select

OPEN = "open"
PENDING = "pending"  # follow-ups buffered, impression not seen yet
CLOSING = "closing"  # output decided and stored, not yet confirmed as delivered
CLOSED = "closed"

# Follow-up kinds as stored in a group's state: event_id -> [ts, ...payload].
_CLICKS = "clicks"
_ORDERS = "orders"
_RETURNS = "returns"
_SELECTS = "selects"


class GroupingSettings(Settings):
    """Attribution window of the group builder, in event-time seconds."""

    window_s: float = Field(
        default=1800.0,
        gt=0.0,
        allow_inf_nan=False,
        description="follow-ups within this many seconds after an impression are attributed",
    )
    allowed_lateness_s: float = Field(
        default=60.0,
        ge=0.0,
        allow_inf_nan=False,
        description="the watermark trails the largest event time seen by this many seconds",
    )
    closed_retention_s: float = Field(
        default=3600.0,
        ge=0.0,
        allow_inf_nan=False,
        description="a closed group is remembered this long (event time) to recognise replays and late events",
    )
    idle_after_s: float = Field(
        default=120.0,
        ge=0.0,
        allow_inf_nan=False,
        description="a partition without events for this many wall-clock seconds is idle: its watermark moves on "
        "with the wall clock, so its open groups still close (0 = never)",
    )

    max_pending_follow_ups: int = Field(
        default=64, ge=1, description="follow-ups buffered per impression not seen yet; more are counted and dropped"
    )
    max_pending_impressions: int = Field(
        default=100_000,
        ge=1,
        description="impressions not seen yet with buffered follow-ups, per partition; more are dropped",
    )


GroupOutput = GroupSample | GroupDrop


def idle_watermark(event_watermark: float, idle_s: float, settings: GroupingSettings) -> float | None:
    """The watermark of a partition that has had no events for ``idle_s`` wall-clock seconds since its events moved
    the watermark to ``event_watermark``: event time is taken to have advanced with the wall clock. None while the
    partition is not idle (or idleness is switched off)."""
    if settings.idle_after_s <= 0.0 or idle_s < settings.idle_after_s or not math.isfinite(event_watermark):
        return None
    return event_watermark + idle_s


def impression_key(partition: int, user_id: str, impression_id: str) -> str:
    """The key of one viewer's group of one impression on one partition (the user id's length keeps the key
    unambiguous whatever the ids hold)."""
    return f"{partition_prefix(partition)}{len(user_id)}:{user_id}:{impression_id}"


def partition_prefix(partition: int) -> str:
    return f"i:{partition}:"


def watermark_key(partition: int) -> str:
    return f"w:{partition}"


class GroupBuilder:
    """The group builder of one partition over a key-value store shared with the other partitions' builders."""

    def __init__(self, settings: GroupingSettings, store: MutableMapping[str, Any], partition: int) -> None:
        self.settings = settings
        self.partition = partition
        self.counts: Counter[str] = Counter()
        self._store = store
        self._due: list[tuple[float, str]] = []  # (due event time, impression_id), lazily rebuilt
        self._indexed = False
        self._unconfirmed: list[GroupOutput] = []
        self._pending_impressions = 0  # keys in PENDING status, counted when the index is built
        stored = store.get(watermark_key(partition))
        self._watermark = float(stored) if stored is not None else -math.inf

    @property
    def watermark(self) -> float:
        return self._watermark

    def process(self, event: AnyEvent) -> list[GroupOutput]:
        """Fold one event into the state; returns the samples and drops of the groups this event closed."""
        self._ensure_index()
        outputs = self._take_unconfirmed()
        if isinstance(event, Impression):
            outputs.extend(self._on_impression(event))
        elif isinstance(event, Click | Order | Return | Select):
            self._on_follow_up(event)
        elif not isinstance(event, DesignCreated):
            raise TypeError(f"unexpected event type {type(event).__name__}")
        outputs.extend(self.advance(event.ts - self.settings.allowed_lateness_s))
        return outputs

    def advance(self, watermark: float) -> list[GroupOutput]:
        """Move the watermark forward (never back) and close, expire or forget every group now due."""
        self._ensure_index()
        outputs = self._take_unconfirmed()
        if watermark <= self._watermark:
            return outputs
        self._watermark = watermark
        while self._due and self._due[0][0] < watermark:
            due, key = heapq.heappop(self._due)
            state = self._store.get(key)
            if state is None or state["due"] != due:
                continue  # superseded index entry
            try:
                if state["status"] == OPEN:
                    outputs.append(self._close(key, state))
                elif state["status"] == PENDING:
                    outputs.append(self._expire_orphans(key, state))
                elif state["status"] == CLOSED:
                    del self._store[key]
            except (KeyError, TypeError, ValueError) as exc:  # ValidationError is a ValueError
                self._forget_unreadable(key, exc)
        # Stored at every advance (the agents' store logs a key once per batch): a restarted builder must resume
        # from the watermark its committed events left, or it may decide "late" differently than before the crash.
        self._store[watermark_key(self.partition)] = watermark
        return outputs

    def open_groups(self) -> int:
        self._ensure_index()
        return sum(1 for _, state in self._own_states() if state["status"] == OPEN)

    def _forget_unreadable(self, key: str, exc: Exception) -> None:
        log.error("partition %d: group state %s cannot be read (%s: %s); forgotten", self.partition, key,
                  type(exc).__name__, exc)  # fmt: skip
        self.counts["unreadable_group"] += 1
        self._store.pop(key, None)

    # ------------------------------------------------------------------------------------------------ events

    def _on_impression(self, impression: Impression) -> list[GroupOutput]:
        key = impression_key(self.partition, impression.user_id, impression.event_id)
        state = self._store.get(key)
        if state is not None and state["status"] in (OPEN, CLOSING, CLOSED):
            self.counts["duplicate_impression"] += 1
            return []
        close_at = impression.ts + self.settings.window_s
        if close_at < self._watermark:
            self.counts["late_impression"] += 1
            if state is not None:  # PENDING: its follow-ups were by this viewer; they go with the drop
                self._pending_impressions -= 1
            drop = GroupDrop(
                sample_id=impression.event_id,
                user_id=impression.user_id,
                design_id=impression.design_id,
                reason="late_impression",
                impression_ts=impression.ts,
                watermark=self._watermark,
            )
            return [self._hold_output(key, close_at, drop)]
        follow_ups = state["follow_ups"] if state is not None else _empty_follow_ups()
        if state is not None:  # PENDING: its follow-ups are this group's now
            self._pending_impressions -= 1
        self._put(
            key,
            {
                "p": self.partition,
                "status": OPEN,
                "due": close_at,
                "impression": impression.model_dump(mode="json"),
                "follow_ups": follow_ups,
            },
        )
        return []

    def _on_follow_up(self, event: FollowUp) -> None:
        key = impression_key(self.partition, event.user_id, event.impression_id)
        state = self._store.get(key)
        if state is not None and state["status"] in (CLOSING, CLOSED):
            self.counts["late_follow_up"] += 1
            return
        if state is not None and state["status"] == OPEN and event.ts > state["due"]:
            self.counts["outside_window"] += 1
            return
        if state is None:
            if self._pending_impressions >= self.settings.max_pending_impressions:
                self.counts["orphan_overflow"] += 1
                return
            self._pending_impressions += 1
            state = {
                "p": self.partition,
                "status": PENDING,
                "due": math.inf,
                "follow_ups": _empty_follow_ups(),
                "orphan": {
                    "impression_id": event.impression_id,
                    "user_id": event.user_id,
                    "design_id": event.design_id,
                },
            }
        kind, payload = _follow_up_entry(event)
        entries = state["follow_ups"][kind]
        if event.event_id in entries:
            self.counts["duplicate_follow_up"] += 1
            return
        if state["status"] == PENDING and _follow_up_count(state) >= self.settings.max_pending_follow_ups:
            self.counts["orphan_overflow"] += 1
            return
        follow_ups = {**state["follow_ups"], kind: {**entries, event.event_id: [event.ts, *payload]}}
        due = state["due"]
        if state["status"] == PENDING:
            # The owning impression (ts <= this event's ts) can arrive in time only until this moment.
            due = min(due, event.ts + self.settings.window_s)
        self._put(key, {**state, "due": due, "follow_ups": follow_ups})

    def _expire_orphans(self, key: str, state: dict[str, Any]) -> GroupOutput:
        """The follow-ups of an impression that never came, as one counted drop."""
        self._pending_impressions -= 1
        follow_ups = _follow_up_count(state)
        self.counts["orphan_follow_up"] += follow_ups
        orphan = state["orphan"]
        drop = GroupDrop(
            sample_id=orphan["impression_id"],
            user_id=orphan["user_id"],
            design_id=orphan["design_id"],
            reason="orphan_follow_up",
            impression_ts=min(entry[0] for entries in state["follow_ups"].values() for entry in entries.values()),
            watermark=self._watermark,
            follow_ups=follow_ups,
        )
        return self._hold_output(key, float(state["due"]), drop)

    # ------------------------------------------------------------------------------------------------ closing

    def _close(self, key: str, state: dict[str, Any]) -> GroupOutput:
        impression = Impression.model_validate(state["impression"], strict=False)
        close_at = float(state["due"])
        sample = group_sample(impression, state["follow_ups"], close_at)
        self.counts["outside_window"] += _follow_up_count(state) - _follow_up_count(state, until=close_at)
        self.counts["sample"] += 1
        return self._hold_output(key, close_at, sample)

    def _hold_output(self, key: str, close_at: float, output: GroupOutput) -> GroupOutput:
        kind = "sample" if isinstance(output, GroupSample) else "drop"
        self._store[key] = {
            "p": self.partition,
            "status": CLOSING,
            "due": close_at + self.settings.closed_retention_s,
            "output": [kind, output.model_dump(mode="json")],
        }
        return output

    def confirm(self, outputs: Iterable[GroupOutput]) -> None:
        """Record that ``outputs`` were delivered: their groups shrink to closed markers kept for the retention."""
        for output in outputs:
            key = impression_key(self.partition, output.user_id, output.sample_id)
            state = self._store.get(key)
            if state is not None and state["status"] == CLOSING:
                self._put(key, {"p": self.partition, "status": CLOSED, "due": state["due"]})

    def _put(self, key: str, state: dict[str, Any]) -> None:
        self._store[key] = state
        if math.isfinite(state["due"]):
            heapq.heappush(self._due, (state["due"], key))

    # ------------------------------------------------------------------------------------------------ index

    def _own_states(self) -> Iterable[tuple[str, dict[str, Any]]]:
        prefix = partition_prefix(self.partition)
        for key in [key for key in self._store if key.startswith(prefix)]:
            try:
                state = self._store[key]
            except (KeyError, ValueError) as exc:
                self._forget_unreadable(key, exc)
                continue
            if isinstance(state, dict) and state.get("p") == self.partition:
                yield key, state

    def _take_unconfirmed(self) -> list[GroupOutput]:
        outputs, self._unconfirmed = self._unconfirmed, []
        return outputs

    def _ensure_index(self) -> None:
        """Build the due-time index on first use, and collect the outputs held but never confirmed (to resend)."""
        if self._indexed:
            return
        self._due = []
        self._pending_impressions = 0
        unconfirmed: list[GroupOutput] = []
        for key, state in list(self._own_states()):
            try:
                if state["status"] == CLOSING:
                    kind, payload = state["output"]
                    record_type = GroupSample if kind == "sample" else GroupDrop
                    unconfirmed.append(record_type.model_validate(payload, strict=False))
                elif math.isfinite(state["due"]):
                    self._due.append((float(state["due"]), key))
                self._pending_impressions += state["status"] == PENDING
            except (KeyError, TypeError, ValueError) as exc:
                self._forget_unreadable(key, exc)
        heapq.heapify(self._due)
        self._unconfirmed = unconfirmed
        self._indexed = True


def _empty_follow_ups() -> dict[str, dict[str, list[Any]]]:
    return {_CLICKS: {}, _ORDERS: {}, _RETURNS: {}, _SELECTS: {}}


def _follow_up_entry(event: FollowUp) -> tuple[str, list[Any]]:
    """Where a follow-up is stored and what of it is kept (after its event time)."""
    if isinstance(event, Click):
        return _CLICKS, [event.image_id]
    if isinstance(event, Order):
        return _ORDERS, [event.image_id, event.quantity]
    if isinstance(event, Return):
        return _RETURNS, [event.order_id, event.quantity]
    return _SELECTS, list(event.image_ids)


def _follow_up_count(state: dict[str, Any], until: float = math.inf) -> int:
    return sum(1 for entries in state["follow_ups"].values() for entry in entries.values() if entry[0] <= until)


def group_sample(impression: Impression, follow_ups: dict[str, dict[str, list[Any]]], close_at: float) -> GroupSample:
    """The graded sample of one impression from its stored follow-ups; those after ``close_at`` do not count."""

    def within(kind: str) -> list[list[Any]]:
        return [entry for entry in follow_ups[kind].values() if entry[0] <= close_at]

    returned_quantity: Counter[str] = Counter()
    for _, order_id, quantity in within(_RETURNS):
        returned_quantity[order_id] += quantity
    click_level: set[str] = {image_id for _, image_id in within(_CLICKS)}
    for _, *image_ids in within(_SELECTS):
        click_level.update(image_ids)
    order_level: set[str] = set()
    for order_id, (ts, image_id, quantity) in follow_ups[_ORDERS].items():
        if ts > close_at:
            continue
        if quantity > returned_quantity[order_id]:
            order_level.add(image_id)
        else:
            click_level.add(image_id)
    graded = [
        GradedCandidate(
            image_id=candidate.image_id,
            position=candidate.position,
            descriptor=candidate.descriptor,
            grade=GRADE_ORDER
            if candidate.image_id in order_level
            else GRADE_CLICK
            if candidate.image_id in click_level
            else GRADE_NONE,
        )
        for candidate in impression.candidates
    ]
    return GroupSample(
        sample_id=impression.event_id,
        user_id=impression.user_id,
        design_id=impression.design_id,
        prompt=impression.prompt,
        model_version=impression.model_version,
        impression_ts=impression.ts,
        candidates=graded,
    )


def batch_group_outputs(events: Iterable[AnyEvent], settings: GroupingSettings) -> dict[str, GroupOutput]:
    """Reference computation from a raw event log, by event time and without a watermark: every distinct
    impression's sample, keyed by sample_id, from its viewer's follow-ups. Equals what the stream builder emits for
    any arrival order within the allowed lateness."""
    impressions: dict[str, Impression] = {}
    follow_ups: dict[tuple[str, str], dict[str, dict[str, list[Any]]]] = {}
    for event in events:
        if isinstance(event, Impression):
            impressions.setdefault(event.event_id, event)
        elif isinstance(event, Click | Order | Return | Select):
            kind, payload = _follow_up_entry(event)
            per_kind = follow_ups.setdefault((event.user_id, event.impression_id), _empty_follow_ups())[kind]
            per_kind.setdefault(event.event_id, [event.ts, *payload])
    return {
        impression_id: group_sample(
            impression,
            follow_ups.get((impression.user_id, impression_id), _empty_follow_ups()),
            impression.ts + settings.window_s,
        )
        for impression_id, impression in impressions.items()
    }
