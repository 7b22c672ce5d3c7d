"""``POST /events``: whether a posted event may go to Kafka, and the event as it goes.

A posted event passes, in this order (the first rule it breaks refuses it, and nothing of it reaches Kafka):

1. it is a bounded JSON object (:mod:`service.event_body`) and a valid event record (422 ``invalid-event``); the
   service fills in what the client left out: ``event_id`` (a new unique id), ``ts`` (its clock) and, for a
   shopper or a merchant, ``user_id`` (the principal);
2. its kind is one clients post (click, select, order, return) and the caller's role may post it (403): clicks
   come from shoppers, selections from merchants, orders and returns from the order system only;
3. a shopper or merchant posts for themselves: ``user_id`` is the principal (403);
4. ``ts`` is within :attr:`AuthSettings.max_clock_skew_s` of the service's clock, either way (422), and an order
   is of 1 to :attr:`AuthSettings.max_quantity` units (422);
5. the design exists (404), and a merchant's selection is of their own design (403);
6. it names an impression this service served to ``user_id`` (a shopper naming another's impression: 403; an
   unknown impression, or the order system naming one shown to someone else: 422), of that design, and candidates
   of it (422);
7. a return names an order this service accepted, of the same shopper, impression and image (422), and never
   returns more than is left of it (422); the event id was never used before (409). These two are checked and
   recorded in one step of the :class:`~service.ledger.EventLedger`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from perfusion.contracts.records import Click, InvalidEvent, Order, Return, Select, parse_event
from service.access import EVENT_ACTIONS, acting_for, require, require_own_design
from service.auth import AuthSettings, Principal
from service.designs import DesignRegistry
from service.event_body import EventBodyRefused, check_event_body
from service.ledger import EventLedger, PostedEvent, ServedImpression
from service.problems import Refusal

ACCEPTED_EVENT_TYPES = (Click, Order, Return, Select)
ACCEPTED_EVENT_KINDS = ", ".join(event_type.model_fields["kind"].default for event_type in ACCEPTED_EVENT_TYPES)


class EventAdmission:
    """Checks posted events against the caller, the clock, the designs and the ledger (see the module docstring)."""

    def __init__(
        self,
        settings: AuthSettings,
        designs: DesignRegistry,
        ledger: EventLedger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.designs = designs
        self.ledger = ledger
        self.clock = clock

    def admit(self, principal: Principal, raw: bytes) -> PostedEvent:
        """The event to produce, already kept in the ledger; or a :class:`Refusal` naming the rule it broke."""
        now = self.clock()
        event = self._parse(principal, raw, now)
        kind_action = EVENT_ACTIONS[event.kind]
        require(principal, kind_action)
        acting_for(principal, event.user_id, "user_id")
        self._check_time(event, now)
        if isinstance(event, Order) and event.quantity > self.settings.max_quantity:
            raise Refusal(
                "quantity-out-of-bounds",
                f"quantity: {event.quantity} units is more than one order may be of; order 1 to "
                f"{self.settings.max_quantity}",
                field="quantity",
            )
        design = self.designs.get(event.design_id)
        if isinstance(event, Select):
            require_own_design(principal, design)
        served = self._served(principal, event)
        self._check_candidates(event, served)
        if isinstance(event, Return):
            self._check_return(event)
        self.ledger.admit(event)
        return event

    def _parse(self, principal: Principal, raw: bytes, now: float) -> PostedEvent:
        try:
            payload = check_event_body(raw)
            filled = _filled_in(payload, principal, now)
            # The clock is checked below with the service's own skew, in both directions.
            event = parse_event(json.dumps(filled).encode(), now=math.inf)
        except (EventBodyRefused, InvalidEvent) as exc:
            raise Refusal("invalid-event", exc.reason) from None
        if not isinstance(event, ACCEPTED_EVENT_TYPES):
            raise Refusal(
                "invalid-event",
                f"kind: {event.kind!r} is produced by the service; post one of {ACCEPTED_EVENT_KINDS}",
                field="kind",
            )
        return event

    def _check_time(self, event: PostedEvent, now: float) -> None:
        skew = self.settings.max_clock_skew_s
        if abs(event.ts - now) > skew:
            raise Refusal(
                "timestamp-out-of-skew",
                f"ts: {event.ts:.3f} is {event.ts - now:+.0f} s from the service's clock ({now:.3f}); events "
                f"within {skew:.0f} s of it are accepted: stamp the event with the current time in seconds since "
                "the epoch, or leave ts out",
                field="ts",
            )

    def _served(self, principal: Principal, event: PostedEvent) -> ServedImpression:
        served = self.ledger.impression(event.impression_id)
        if served is None:
            raise Refusal(
                "not-what-was-served",
                f"impression_id: no impression {event.impression_id!r} was served by this service; name the "
                "impression_id of a POST /designs/{id}/candidates response",
                field="impression_id",
            )
        if served.user_id != event.user_id:
            if principal.role in ("shopper", "merchant"):
                raise Refusal(
                    "not-your-resource",
                    f"impression_id: {event.impression_id!r} was served to another user, not to you "
                    f"({principal.describe()}); act on impressions served to you",
                    field="impression_id",
                )
            raise Refusal(
                "not-what-was-served",
                f"impression_id: {event.impression_id!r} was served to another user, not to {event.user_id!r}; name "
                "an impression shown to that shopper",
                field="impression_id",
            )
        if served.design_id != event.design_id:
            raise Refusal(
                "not-what-was-served",
                f"design_id: impression {served.impression_id!r} is of design {served.design_id!r}, not "
                f"{event.design_id!r}; send its design_id",
                field="design_id",
            )
        return served

    @staticmethod
    def _check_candidates(event: PostedEvent, served: ServedImpression) -> None:
        named = event.image_ids if isinstance(event, Select) else [event.image_id]
        field = "image_ids" if isinstance(event, Select) else "image_id"
        for image_id in named:
            if image_id not in served.image_ids:
                raise Refusal(
                    "not-what-was-served",
                    f"{field}: {image_id!r} is not a candidate of impression {served.impression_id!r}; name one of "
                    f"its {len(served.image_ids)} candidates (the image_ids of its candidates response)",
                    field=field,
                )

    def _check_return(self, event: Return) -> None:
        order = self.ledger.order(event.order_id)
        if order is None:
            raise Refusal(
                "not-what-was-served",
                f"order_id: no order {event.order_id!r} was accepted by this service; name the event_id POST /events "
                "answered for the order",
                field="order_id",
            )
        if order.user_id != event.user_id:
            raise Refusal(
                "not-what-was-served",
                f"order_id: order {event.order_id!r} was placed by another shopper, not {event.user_id!r}; a return "
                "names an order of the same shopper",
                field="order_id",
            )
        for field, ordered, returned in (
            ("impression_id", order.impression_id, event.impression_id),
            ("design_id", order.design_id, event.design_id),
            ("image_id", order.image_id, event.image_id),
        ):
            if ordered != returned:
                raise Refusal(
                    "not-what-was-served",
                    f"{field}: order {event.order_id!r} has {field} {ordered!r}, not {returned!r}; a return names "
                    "its order's impression, design and image",
                    field=field,
                )


def _filled_in(payload: dict[str, Any], principal: Principal, now: float) -> dict[str, Any]:
    """The posted fields with the ones the service assigns when left out."""
    filled = dict(payload)
    filled.setdefault("event_id", f"evt-{uuid.uuid4().hex}")
    filled.setdefault("ts", now)
    if principal.role in ("shopper", "merchant"):
        filled.setdefault("user_id", principal.id)
    return filled
