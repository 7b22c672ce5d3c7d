"""Net orders per design and the production trigger: "sell it before you make it".

Per design, net orders are units ordered less units returned (a return counts only against an order that was counted,
and never more than that order's quantity). Orders, returns and the design's own
:class:`~perfusion.contracts.records.DesignCreated` (which carries the threshold) are applied in event-time order, ties
broken by event_id, once the partition's watermark (the largest event time seen less ``allowed_lateness_s``) has passed
them; so any arrival order within the lateness, and any duplication (dedupe by event_id), gives the same result. A
design fires when its net orders have reached its threshold at some point of event time (the peak counts, a later return
does not undo a decision). A design without a known threshold waits for its DesignCreated, or uses ``default_threshold``
when that is set. An event that arrives behind the watermark is applied at once and counted as ``late``: demand is never
dropped, unless it is older than the dedupe retention (Retention, below).

A routed counter (events come from several source partitions, each reporting how far it has been read) follows the
slowest source that is still moving, so events of partitions read at different paces are applied in event-time
order. A source that has reported nothing new for ``idle_after_s`` wall-clock seconds is idle and holds nothing
back (:meth:`DemandCounter.advance_idle`, called on a timer), and when every source is idle event time moves on with
the wall clock from the furthest one: an order that crosses a threshold with no traffic after it fires about
``max(idle_after_s, allowed_lateness_s)`` seconds later, whatever the other partitions do. An event that arrives
behind the watermark is applied at once (counted ``late``). The sources' progress is stored with the
counter's state: a restarted counter resumes from it.

"Exactly once" here means: the state says a design fired at most once, and no crash loses a ProductionOrder.
Firing stores the order in the design's state (``fired = "emitting"``) before the caller sends it; the caller
then calls :meth:`DemandCounter.confirm` (``fired = "done"``). A crash between the two makes the next owner of
the partition send the same record again, under the same key (design_id) with the same content; a reader that
keeps the first record per key (or a compacted topic) sees exactly one production order per design.

Each design's demand as others read it (net orders, the threshold, whether it was reached and whether production was
triggered) is :func:`demand_updates`: the :class:`~perfusion.contracts.records.DesignDemand` of every design whose
state changed since it was last published (:meth:`DemandCounter.take_touched` names the designs written to, and
after a restart every design of the partition whose state differs from its last published record). The caller
sends them and then calls :func:`mark_published`, which keeps the published record in the design's state; so a
crash before that makes the next owner send the same record again, and the demand topic, keyed by design_id and
compacted, holds each design's latest state. None of this changes when or how often a design fires.

State lives in a ``MutableMapping`` under ``d:<design_id>`` (counters, threshold, events not yet applied, the ids and
event times of the design's own events applied), ``o:<partition>:<order_id>`` (the order's event time and quantity,
its returns' ids, units returned, when the record expires), ``w:<partition>`` (the watermark) and ``s:<partition>``
(the progress of each source partition); values are JSON-compatible. An order's key names its partition (a return is
routed by the design_id of its order), so a restarted counter finds its own records by key, decoding no other's.

Retention. What grows with traffic is kept for a stated span of *event time* on the partition's watermark (never the
wall clock), then deleted (a tombstone in the table's changelog, so a compacted changelog stays bounded too):

- an order's record, until the watermark passes the order's event time by ``return_window_s`` (and each of its
  returns' by the dedupe retention). A return counts against its order when stamped at most ``return_window_s``
  after it, or at most the dedupe retention before it (clocks disagree); any other is counted
  ``return_outside_window`` and logged, never taken off net orders. A return whose order is not counted by the time
  its record expires is counted ``return_unknown_order`` and logged;
- event ids, for the *dedupe retention* ``allowed_lateness_s + redelivery_horizon_s`` after their event time: an
  order's id and its returns' live in its record, a DesignCreated's in the design's ``applied`` list, dropped from it
  then. ``redelivery_horizon_s`` is how far the watermark may move on between an event's first delivery and a
  redelivery (a replay from the last committed offset after a crash or a rebalance, a client's retry) that is still
  recognised as a duplicate;
- an event further behind the watermark than the dedupe retention is dropped, counted ``expired`` and logged: its
  id may be forgotten, so counting it could count a redelivery twice. So nothing is counted twice whatever the
  horizon (a redelivery finds its id or is refused); the horizon decides how late a new event may be and still count;
- a design's own state (``d:``: threshold, counters, whether it fired) is kept for the design's life: it is what
  makes a design fire once, and it grows with the catalogue, not with orders.

So a partition holds one record per order stamped within ``return_window_s`` of the watermark (or with returns of
the last dedupe retention waiting for it), one key per design and two progress keys. The rules are on event time and
expiry follows the events the watermark passed, so production orders stay those of :func:`batch_production_orders`
for any arrival order within the lateness.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Self

from pydantic import Field, model_validator

from perfusion.contracts.records import AnyEvent, DesignCreated, DesignDemand, Order, ProductionOrder, Return
from perfusion.settings import Settings

log = logging.getLogger(__name__)

DemandEvent = DesignCreated | Order | Return

_EMITTING = "emitting"
_DONE = "done"


class DemandSettings(Settings):
    """How demand is counted per design, and how long what it remembers is kept (module docstring, Retention)."""

    allowed_lateness_s: float = Field(
        default=60.0,
        ge=0.0,
        allow_inf_nan=False,
        description="the watermark trails the largest event time seen by this many seconds",
    )
    default_threshold: int | None = Field(
        default=None,
        ge=1,
        description="net orders that start production of a design whose DesignCreated was not seen; None = wait",
    )
    idle_after_s: float = Field(
        default=120.0,
        ge=0.0,
        allow_inf_nan=False,
        description="a source partition that reports no progress for this many wall-clock seconds is taken to move "
        "on with the wall clock, so demand already routed is applied without other traffic (0 = never)",
    )
    return_window_s: float = Field(
        default=30 * 86_400.0,
        ge=0.0,
        allow_inf_nan=False,
        description="a return counts against its order when stamped at most this many seconds after it; the order's "
        "record is deleted once the watermark passes the order's event time by this much (event time, seconds; at "
        "least allowed_lateness_s + redelivery_horizon_s)",
    )
    redelivery_horizon_s: float = Field(
        default=3600.0,
        ge=0.0,
        allow_inf_nan=False,
        description="event time the watermark may move on between an event's first delivery and a redelivery still "
        "recognised as a duplicate: event ids are kept allowed_lateness_s + this after their event time, and an "
        "event further behind the watermark is dropped and counted expired (seconds)",
    )

    @property
    def dedupe_retention_s(self) -> float:
        """Event-time seconds an event id is remembered after its event time, on the watermark."""
        return self.allowed_lateness_s + self.redelivery_horizon_s

    @model_validator(mode="after")
    def _window_keeps_order_ids(self) -> Self:
        if self.return_window_s < self.dedupe_retention_s:
            raise ValueError(
                f"return_window_s must be at least allowed_lateness_s + redelivery_horizon_s "
                f"({self.dedupe_retention_s:g} s), got {self.return_window_s:g}: an order's record holds its id, "
                "which must outlive every redelivery that is not refused as expired"
            )
        return self


def is_demand_event(event: AnyEvent) -> bool:
    return isinstance(event, DesignCreated | Order | Return)


def design_key(design_id: str) -> str:
    return f"d:{design_id}"


def order_key(partition: int, order_id: str) -> str:
    return f"o:{partition}:{order_id}"


def watermark_key(partition: int) -> str:
    return f"w:{partition}"


def source_progress_key(partition: int) -> str:
    return f"s:{partition}"


def _new_design(partition: int) -> dict[str, Any]:
    return {"p": partition, "threshold": None, "net": 0, "peak": 0, "fired": None, "pending": [], "applied": []}


def _new_order_record() -> dict[str, Any]:
    # ts and quantity are the order's (None until it is seen); waiting: [ts, units, id] of returns applied before it;
    # expires: the watermark past which the record is deleted.
    return {
        "ts": None,
        "quantity": None,
        "applied": False,
        "returned": 0,
        "waiting": [],
        "returns": [],
        "expires": None,
    }


class DemandCounter:
    """Demand of the designs of one partition, over a key-value store shared with other partitions' counters."""

    def __init__(
        self,
        settings: DemandSettings,
        store: MutableMapping[str, Any],
        partition: int,
        source_partitions: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``source_partitions`` None: the watermark follows the event times seen here. A number: events come
        routed from that many source partitions, each of which reports its progress with :meth:`observe_source`;
        the watermark follows the slowest of them still moving (:meth:`advance_idle` leaves quiet ones out).
        ``clock`` gives wall-clock seconds, for the idle rule."""
        self.settings = settings
        self.partition = partition
        self._clock = clock
        self._source_progress: list[float] | None = None
        self._source_reported_at: list[float] = []  # wall-clock time each source last moved; not stored
        if source_partitions is not None:
            stored_progress = store.get(source_progress_key(partition))
            self._source_progress = (
                [-math.inf if value is None else float(value) for value in stored_progress]
                if isinstance(stored_progress, list) and len(stored_progress) == source_partitions
                else [-math.inf] * source_partitions
            )
            self._source_reported_at = [clock()] * source_partitions
        self.counts: Counter[str] = Counter()
        self._store = store
        self._due: list[tuple[float, str]] = []  # (earliest pending event time, design_id), lazily rebuilt
        # (watermark past which to look at the key, key): order records, and designs' applied ids; lazily rebuilt.
        self._expiring: list[tuple[float, str]] = []
        self._indexed = False
        self._unconfirmed: list[ProductionOrder] = []
        self._touched: set[str] = set()  # designs whose state was written since the last take_touched
        stored = store.get(watermark_key(partition))
        self._watermark = float(stored) if stored is not None else -math.inf

    @property
    def watermark(self) -> float:
        return self._watermark

    def process(self, event: AnyEvent) -> list[ProductionOrder]:
        """Fold one event in; returns the production orders to send (then :meth:`confirm` them)."""
        self._ensure_index()
        outputs, self._unconfirmed = self._unconfirmed, []
        if isinstance(event, DesignCreated | Order | Return) and not self._refused_as_expired(event):
            late = event.ts < self._watermark
            if self._admit(event) and late:
                self.counts["late"] += 1
                outputs.extend(self._apply_due(event.design_id, self._watermark))
        if self._source_progress is None:
            outputs.extend(self.advance(event.ts - self.settings.allowed_lateness_s))
        return outputs

    def observe_source(self, source_partition: int, max_event_ts: float) -> list[ProductionOrder]:
        """A source partition has been read up to ``max_event_ts``: the watermark may advance."""
        if self._source_progress is None:
            raise ValueError("observe_source needs a counter built with source_partitions")
        self._ensure_index()
        outputs, self._unconfirmed = self._unconfirmed, []
        progress = self._source_progress
        if max_event_ts > progress[source_partition]:
            progress[source_partition] = max_event_ts
            self._source_reported_at[source_partition] = self._clock()
            # -inf (never reported) is stored as null: JSON has no infinities.
            self._store[source_progress_key(self.partition)] = [v if math.isfinite(v) else None for v in progress]
        return outputs + self._advance_with_sources()

    def advance_idle(self) -> list[ProductionOrder]:
        """Apply the idle rule on the wall clock (see :meth:`_advance_with_sources`); returns the production orders
        this releases."""
        if self._source_progress is None:
            raise ValueError("advance_idle needs a counter built with source_partitions")
        self._ensure_index()
        outputs, self._unconfirmed = self._unconfirmed, []
        return outputs + self._advance_with_sources()

    def _advance_with_sources(self) -> list[ProductionOrder]:
        """The watermark follows the slowest source that is still moving: a source quiet for ``idle_after_s``
        wall-clock seconds (or one that never reported, once the counter has waited that long) is idle and holds
        nothing back, as an idle partition does in a stream processor's watermark. When every source is idle, event
        time is taken to move on with the wall clock from the furthest one. So events of sources read at different
        paces are applied in event-time order, and an order with no traffic after it fires about
        ``max(idle_after_s, allowed_lateness_s)`` seconds later."""
        assert self._source_progress is not None
        idle_after_s = self.settings.idle_after_s
        now = self._clock()
        moving: list[float] = []
        idle: list[float] = []
        for progress, reported_at in zip(self._source_progress, self._source_reported_at, strict=True):
            quiet_s = now - reported_at
            if idle_after_s <= 0.0 or quiet_s < idle_after_s:
                moving.append(progress)
            elif math.isfinite(progress):
                idle.append(progress + quiet_s)
        if moving:
            read_to = min(moving)
        elif idle:
            read_to = max(idle)
        else:
            return []
        return self.advance(read_to - self.settings.allowed_lateness_s)

    def advance(self, watermark: float) -> list[ProductionOrder]:
        """Move the watermark forward (never back), apply every pending event it has passed, then delete what the
        retention policy no longer keeps."""
        self._ensure_index()
        if watermark <= self._watermark:
            return []
        self._watermark = watermark
        outputs: list[ProductionOrder] = []
        while self._due and self._due[0][0] < watermark:
            _, design_id = heapq.heappop(self._due)
            outputs.extend(self._apply_due(design_id, watermark))
        # Stored at every advance (logged once per batch), so a restarted counter resumes from the watermark its
        # committed events left and judges lateness as it did before the crash. Stored before the expiry deletes
        # anything: the changelog logs keys in the order they were first changed, so a crash in the middle of a
        # flush that logged a tombstone has logged this watermark too, which refuses a redelivery of what it deleted.
        self._store[watermark_key(self.partition)] = watermark
        self._expire(watermark)
        return outputs

    def confirm(self, orders: Iterable[ProductionOrder]) -> None:
        """Record that ``orders`` were delivered."""
        for production_order in orders:
            key = design_key(production_order.design_id)
            state = self._store.get(key)
            if state is not None and state["fired"] == _EMITTING:
                self._store[key] = {**state, "fired": _DONE, "order": None, "produced_ts": production_order.ts}
                self._touched.add(production_order.design_id)

    def design_state(self, design_id: str) -> dict[str, Any] | None:
        return self._store.get(design_key(design_id))

    def order_record(self, order_id: str) -> dict[str, Any] | None:
        return self._store.get(order_key(self.partition, order_id))

    def take_touched(self) -> set[str]:
        """The designs whose state was written since the last call (for :func:`demand_updates`), and forget them."""
        touched, self._touched = self._touched, set()
        return touched

    # ------------------------------------------------------------------------------------------------ arrival

    def _refused_as_expired(self, event: DemandEvent) -> bool:
        """An event further behind the watermark than the dedupe retention: its id may be forgotten, so it is
        dropped (a redelivery of it is never counted twice)."""
        behind_s = self._watermark - event.ts
        if behind_s <= self.settings.dedupe_retention_s:
            return False
        self.counts["expired"] += 1
        log.warning(
            "dropped %s %s of design %s: stamped %.0f s behind the watermark, past the dedupe retention of %.0f s",
            event.kind, event.event_id, event.design_id, behind_s, self.settings.dedupe_retention_s,
        )  # fmt: skip
        return True

    def _admit(self, event: DemandEvent) -> bool:
        """Dedupe and queue one event for application in event-time order; False for a duplicate or a return
        outside its order's window."""
        key = design_key(event.design_id)
        state = self._store.get(key) or _new_design(self.partition)
        if isinstance(event, Order | Return):
            # An order is one key of its own; a return is remembered by the order it names.
            order_id = event.event_id if isinstance(event, Order) else event.order_id
            key_of_order = order_key(self.partition, order_id)
            record = self._store.get(key_of_order) or _new_order_record()
            if isinstance(event, Order):
                if record["quantity"] is not None:
                    self.counts["duplicate"] += 1
                    return False
                keep_until = event.ts + self.settings.return_window_s
                record = {**record, "ts": event.ts, "quantity": event.quantity}
            else:
                if event.event_id in record["returns"]:
                    self.counts["duplicate"] += 1
                    return False
                if record["ts"] is not None and not self._within_window(event.ts, record["ts"]):
                    self._outside_window(event.event_id, order_id, event.ts - record["ts"])
                    return False
                keep_until = event.ts + self.settings.dedupe_retention_s
                record = {**record, "returns": [*record["returns"], event.event_id]}
            self._keep_order_record(key_of_order, record, keep_until)
            entry = [event.ts, event.event_id, event.kind, order_id, event.quantity]
        else:
            ids = [a[0] if isinstance(a, list) else a for a in state["applied"]]  # str: logged before retention
            if event.event_id in ids or any(pending[1] == event.event_id for pending in state["pending"]):
                self.counts["duplicate"] += 1
                return False
            entry = [event.ts, event.event_id, event.kind, None, event.order_threshold]
        self._store[key] = {**state, "pending": [*state["pending"], entry]}
        self._touched.add(event.design_id)
        heapq.heappush(self._due, (event.ts, event.design_id))
        return True

    def _keep_order_record(self, key: str, record: dict[str, Any], until: float) -> None:
        """Store an order record, kept at least until the watermark passes ``until``."""
        expires = record["expires"]
        if expires is None or until > expires:
            record = {**record, "expires": until}
            heapq.heappush(self._expiring, (until, key))
        self._store[key] = record

    def _within_window(self, return_ts: float, order_ts: float) -> bool:
        """Whether a return stamped ``return_ts`` counts against an order stamped ``order_ts`` (event time alone,
        so the answer is the same whatever the arrival order)."""
        settings = self.settings
        return order_ts - settings.dedupe_retention_s <= return_ts <= order_ts + settings.return_window_s

    def _outside_window(self, return_id: str, order_id: str, after_order_s: float) -> None:
        self.counts["return_outside_window"] += 1
        window = f"[-{self.settings.dedupe_retention_s:.0f} s, {self.settings.return_window_s:.0f} s]"
        log.info("return %s of order %s not counted: stamped %.0f s after it, outside the return window %s",
                 return_id, order_id, after_order_s, window)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ application

    def _apply_due(self, design_id: str, watermark: float) -> list[ProductionOrder]:
        key = design_key(design_id)
        state = self._store.get(key)
        if state is None:
            return []
        due = sorted(entry for entry in state["pending"] if entry[0] < watermark)
        if not due:
            return []
        state = {**state, "pending": [entry for entry in state["pending"] if entry[0] >= watermark]}
        if state["pending"]:
            # The index holds one entry per design after a restart: re-index what is still waiting.
            heapq.heappush(self._due, (min(entry[0] for entry in state["pending"]), design_id))
        outputs: list[ProductionOrder] = []
        for ts, event_id, kind, order_id, amount in due:
            if kind == "design":
                if state["threshold"] is None:
                    state["threshold"] = amount
                else:
                    self.counts["second_design_event"] += 1
                state["applied"] = [*state["applied"], [event_id, ts]]
                heapq.heappush(self._expiring, (ts + self.settings.dedupe_retention_s, key))
            elif kind == "order":
                state["net"] += amount - self._apply_order(order_id)
            else:
                state["net"] -= self._apply_return(order_id, event_id, ts, amount)
            state["peak"] = max(state["peak"], state["net"])
            fired = self._maybe_fire(design_id, state, ts)
            if fired is not None:
                outputs.append(fired)
        self._store[key] = state
        self._touched.add(design_id)
        return outputs

    def _apply_order(self, order_id: str) -> int:
        """Marks the order counted; returns the units of returns that were waiting for it (those within its
        window, at most its quantity)."""
        key = order_key(self.partition, order_id)
        record = self._store.get(key)  # kept until the watermark passes the order: there when the order applies,
        if record is None:  # unless it was logged under the key format before partitions (o:<order_id>)
            return 0
        backlog = 0
        for return_ts, units, return_id in record["waiting"]:
            if self._within_window(return_ts, record["ts"]):
                backlog += units
            else:
                self._outside_window(return_id, order_id, return_ts - record["ts"])
        backlog = min(backlog, record["quantity"])
        self._store[key] = {**record, "applied": True, "waiting": [], "returned": backlog}
        return backlog

    def _apply_return(self, order_id: str, return_id: str, ts: float, quantity: int) -> int:
        """Units this return takes off net orders: none until its order is counted, then at most what is left, and
        none when it is outside the order's window."""
        key = order_key(self.partition, order_id)
        record = self._store.get(key)
        if record is None:  # a record outlives the events it names, unless logged under the key format before it
            return 0
        if not record["applied"]:
            self._store[key] = {**record, "waiting": [*record["waiting"], [ts, quantity, return_id]]}
            return 0
        if not self._within_window(ts, record["ts"]):
            self._outside_window(return_id, order_id, ts - record["ts"])
            return 0
        taken = min(quantity, record["quantity"] - record["returned"])
        self._store[key] = {**record, "returned": record["returned"] + taken}
        return taken

    def _maybe_fire(self, design_id: str, state: dict[str, Any], ts: float) -> ProductionOrder | None:
        threshold = state["threshold"] if state["threshold"] is not None else self.settings.default_threshold
        if state["fired"] is not None or threshold is None or state["peak"] < threshold:
            return None
        production_order = ProductionOrder(design_id=design_id, net_orders=state["peak"], threshold=threshold, ts=ts)
        state["fired"] = _EMITTING
        state["order"] = production_order.model_dump(mode="json")
        self.counts["fired"] += 1
        return production_order

    # ------------------------------------------------------------------------------------------------ expiry

    def _expire(self, watermark: float) -> None:
        """Delete the order records and forget the design event ids that the watermark has passed the retention of.
        Runs after the events the watermark passed were applied, so no pending event loses the record it names."""
        retention_s = self.settings.dedupe_retention_s
        while self._expiring and self._expiring[0][0] < watermark:
            due, key = heapq.heappop(self._expiring)
            state = self._store.get(key)
            if state is None:
                continue
            if key.startswith("d:"):
                kept = [a for a in state["applied"] if isinstance(a, list) and a[1] + retention_s >= watermark]
                if len(kept) < len(state["applied"]):
                    self._store[key] = {**state, "applied": kept}
            elif state["expires"] == due:  # else it was kept longer since, and has an entry for that
                if state["waiting"]:
                    self.counts["return_unknown_order"] += len(state["waiting"])
                    log.info("returns %s of order %s not counted: the order was not seen within the dedupe retention",
                             [waiting[2] for waiting in state["waiting"]], key.split(":", 2)[2])  # fmt: skip
                del self._store[key]
                self.counts["order_records_expired"] += 1

    # ------------------------------------------------------------------------------------------------ index

    def _ensure_index(self) -> None:
        if self._indexed:
            return
        self._due, self._expiring = [], []
        retention_s = self.settings.dedupe_retention_s
        own_orders = order_key(self.partition, "")
        for key in list(self._store):
            if key.startswith(own_orders):  # an order record of this partition
                self._expiring.append((self._store[key]["expires"], key))
            state = self._store[key] if key.startswith("d:") else None
            if state is None or state.get("p") != self.partition:
                continue
            if state["pending"]:
                self._due.append((min(entry[0] for entry in state["pending"]), key[2:]))
            # An id without its event time (logged before retention) is forgotten at the design's next expiry.
            self._expiring.extend((a[1] + retention_s, key) for a in state["applied"] if isinstance(a, list))
            if state["fired"] == _EMITTING:
                self._unconfirmed.append(ProductionOrder.model_validate(state["order"], strict=False))
            if _unpublished(key[2:], state, self.settings) is not None:
                self._touched.add(key[2:])  # a change whose record a crash kept from being sent: send it now
        heapq.heapify(self._due)
        heapq.heapify(self._expiring)
        self._indexed = True


def design_demand(design_id: str, state: dict[str, Any], settings: DemandSettings) -> DesignDemand:
    """What a design's counter state says of its demand."""
    threshold = state["threshold"] if state["threshold"] is not None else settings.default_threshold
    triggered = state["fired"] == _DONE
    return DesignDemand(
        design_id=design_id,
        net_orders=state["net"],
        peak_net_orders=state["peak"],
        threshold=threshold,
        threshold_reached=threshold is not None and state["peak"] >= threshold,
        production_triggered=triggered,
        production_ts=state.get("produced_ts") if triggered else None,
    )


def demand_updates(
    store: MutableMapping[str, Any], design_ids: Iterable[str], settings: DemandSettings
) -> list[DesignDemand]:
    """The demand of each of ``design_ids`` that differs from what was last published for it (by design_id)."""
    updates: list[DesignDemand] = []
    for design_id in sorted(design_ids):
        state = store.get(design_key(design_id))
        if state is None:
            continue
        demand = _unpublished(design_id, state, settings)
        if demand is not None:
            updates.append(demand)
    return updates


def _unpublished(design_id: str, state: dict[str, Any], settings: DemandSettings) -> DesignDemand | None:
    """The design's demand when it differs from the record last published for it, else None."""
    demand = design_demand(design_id, state, settings)
    # Before anything was published for a design, a state of no orders and no known threshold is not news.
    published = state.get("published") or _unknown_demand(design_id).model_dump(mode="json")
    return demand if demand.model_dump(mode="json") != published else None


def _unknown_demand(design_id: str) -> DesignDemand:
    return DesignDemand(
        design_id=design_id,
        net_orders=0,
        peak_net_orders=0,
        threshold=None,
        threshold_reached=False,
        production_triggered=False,
        production_ts=None,
    )


def mark_published(store: MutableMapping[str, Any], demands: Iterable[DesignDemand]) -> None:
    """Keep in each design's state that its ``demands`` record was delivered (after the broker acknowledged it)."""
    for demand in demands:
        key = design_key(demand.design_id)
        state = store.get(key)
        if state is not None:
            store[key] = {**state, "published": demand.model_dump(mode="json")}


def batch_production_orders(events: Iterable[AnyEvent], settings: DemandSettings) -> dict[str, ProductionOrder]:
    """Reference computation from a raw event log: the production order of each design that fires, by design_id.
    Applies every event in event-time order, as the stream counter does for arrivals within the lateness."""
    store: dict[str, Any] = {}
    counter = DemandCounter(settings, store, partition=0)
    unique = {event.event_id: event for event in events if is_demand_event(event)}
    outputs: list[ProductionOrder] = []
    for event in sorted(unique.values(), key=lambda event: (event.ts, event.event_id)):
        outputs.extend(counter.process(event))
    outputs.extend(counter.advance(math.inf))
    return {production_order.design_id: production_order for production_order in outputs}
