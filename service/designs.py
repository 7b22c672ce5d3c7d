"""The design registry: merchants' designs and the demand they have gathered, in sqlite under ``state_dir()``.

Designs are written by ``POST /designs`` and belong to their merchant (who may read them: ``service.access``); what
the service served and accepted for them is its ledger (``service.ledger``). Demand (net orders and whether
production was triggered) is *not* computed by the service from its own requests: events also reach Kafka from other
producers, and the stream worker's demand agent is the one authority that fires production exactly once. So the
service follows the topics with :class:`DemandFollower` (a :class:`~perfusion.follower.TopicFollower` started by
the service):

- ``perfusion.events``: Orders and Returns, each kept once by event id, so a replayed topic does not count twice.
  Net orders follow the worker's rule: a return counts only against an order that was counted, and never for more
  than that order's quantity (returns of one order add up, then are capped at its quantity). A return that arrives
  before its order waits for it; a return naming an order never seen takes nothing off.
- ``perfusion.production-orders``: the demand agent's ProductionOrder marks the design as triggered.

``GET /designs/{id}`` therefore reports what the topics said up to the follower's position, which lags the
events by the follower's poll interval (about a second). The follower keeps no consumer group: it reads both
topics from the beginning at every start and relies on the event-id deduplication above. A record that cannot be
used (malformed, hostile, of an unknown kind) is logged with topic[partition]@offset, counted, and skipped; the
follower goes on with the next one, so one poison record never freezes the view.

Net orders here are counted as records arrive, not in event time as the worker does; once both have read the
same events, the figures agree.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfusion.contracts.records import InvalidEvent, Order, ProductionOrder, Return, parse_event
from perfusion.errors import PerfusionError
from perfusion.follower import FollowedRecord, TopicFollower
from perfusion.paths import state_dir
from service.problems import Refusal
from service.sqlite_store import SqliteStore

logger = logging.getLogger(__name__)

# Units ordered less units returned, each order's returns capped at its quantity; returns naming an order that was
# never counted find no row to join and take nothing off.
_NET_ORDERS = """
SELECT COALESCE(SUM(orders.quantity - MIN(orders.quantity, COALESCE(returned.units, 0))), 0)
FROM orders
LEFT JOIN (SELECT order_id, SUM(quantity) AS units FROM returns GROUP BY order_id) AS returned
    ON returned.order_id = orders.order_id
WHERE orders.design_id = ?
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS designs (
    design_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    order_threshold INTEGER NOT NULL,
    created_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS designs_by_merchant ON designs (merchant_id);
-- Files written before returns were capped kept signed quantities here; the follower rebuilds demand from the
-- topics at every start, so the old table is dropped rather than migrated.
DROP TABLE IF EXISTS demand;
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,  -- the Order's event_id
    design_id TEXT NOT NULL,
    quantity INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_design ON orders (design_id);
CREATE TABLE IF NOT EXISTS returns (
    return_id TEXT PRIMARY KEY,  -- the Return's event_id
    order_id TEXT NOT NULL,
    quantity INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS returns_by_order ON returns (order_id);
CREATE TABLE IF NOT EXISTS production (
    design_id TEXT PRIMARY KEY,
    net_orders INTEGER NOT NULL,
    ts REAL NOT NULL
);
"""


class UnknownDesign(PerfusionError):
    """No design with this id is registered."""


@dataclass(frozen=True)
class Design:
    design_id: str
    merchant_id: str
    prompt: str
    order_threshold: int
    created_ts: float


@dataclass(frozen=True)
class DemandStatus:
    """What the followed topics said about one design."""

    design: Design
    net_orders: int
    production_triggered: bool
    production_ts: float | None


class DesignRegistry(SqliteStore):
    """Designs and their demand in one sqlite file; safe to share between the request threads and the follower."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    @classmethod
    def default(cls) -> DesignRegistry:
        return cls(state_dir() / "service" / "designs.sqlite")

    def create(self, merchant_id: str, prompt: str, order_threshold: int) -> Design:
        design = Design(
            design_id=f"design-{uuid.uuid4().hex[:16]}",
            merchant_id=merchant_id,
            prompt=prompt,
            order_threshold=order_threshold,
            created_ts=time.time(),
        )
        with self._lock:
            self._connection.execute(
                "INSERT INTO designs VALUES (?, ?, ?, ?, ?)",
                (design.design_id, merchant_id, prompt, order_threshold, design.created_ts),
            )
        return design

    def delete(self, design_id: str) -> None:
        """Forget a design whose DesignCreated event could not be produced (so nothing half-exists)."""
        with self._lock:
            self._connection.execute("DELETE FROM designs WHERE design_id = ?", (design_id,))

    def get(self, design_id: str) -> Design:
        with self._lock:
            row = self._connection.execute(
                "SELECT design_id, merchant_id, prompt, order_threshold, created_ts FROM designs WHERE design_id = ?",
                (design_id,),
            ).fetchone()
        if row is None:
            raise UnknownDesign(f"no design {design_id!r}; create one with POST /designs and use the id it returns")
        return Design(*row)

    def designs_of(
        self, merchant_id: str | None = None, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[Design]:
        """A merchant's designs, or every design when ``merchant_id`` is None; oldest first (creation time, then
        id). ``after``: only those after this (created_ts, design_id); ``limit``: at most this many."""
        query = "SELECT design_id, merchant_id, prompt, order_threshold, created_ts FROM designs"
        conditions: list[str] = []
        parameters: list[Any] = []
        if merchant_id is not None:
            conditions.append("merchant_id = ?")
            parameters.append(merchant_id)
        if after is not None:
            conditions.append("(created_ts, design_id) > (?, ?)")
            parameters.extend(after)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        query += " ORDER BY created_ts, design_id"
        if limit is not None:
            query += " LIMIT ?"
            parameters.append(limit)
        with self._lock:
            rows = self._connection.execute(query, parameters).fetchall()
        return [Design(*row) for row in rows]

    def exists(self, design_id: str) -> bool:
        with self._lock:
            row = self._connection.execute("SELECT 1 FROM designs WHERE design_id = ?", (design_id,)).fetchone()
        return row is not None

    def record_order(self, order: Order) -> bool:
        """Count an order once; False if its event id was seen before."""
        with self._lock:
            cursor = self._connection.execute(
                "INSERT OR IGNORE INTO orders VALUES (?, ?, ?)", (order.event_id, order.design_id, order.quantity)
            )
        return cursor.rowcount == 1

    def record_return(self, returned: Return) -> bool:
        """Keep a return once (it takes units off its order's design, capped there); False if seen before."""
        with self._lock:
            cursor = self._connection.execute(
                "INSERT OR IGNORE INTO returns VALUES (?, ?, ?)",
                (returned.event_id, returned.order_id, returned.quantity),
            )
        return cursor.rowcount == 1

    def record_production(self, design_id: str, net_orders: int, ts: float) -> None:
        with self._lock:
            self._connection.execute("INSERT OR IGNORE INTO production VALUES (?, ?, ?)", (design_id, net_orders, ts))

    def status(self, design_id: str) -> DemandStatus:
        design = self.get(design_id)
        with self._lock:
            (net_orders,) = self._connection.execute(_NET_ORDERS, (design_id,)).fetchone()
            production = self._connection.execute(
                "SELECT ts FROM production WHERE design_id = ?", (design_id,)
            ).fetchone()
        return DemandStatus(
            design=design,
            net_orders=int(net_orders),
            production_triggered=production is not None,
            production_ts=None if production is None else float(production[0]),
        )


class DemandFollower:
    """Follows the events and production-orders topics into a :class:`DesignRegistry`, on a daemon thread."""

    def __init__(
        self,
        registry: DesignRegistry,
        bootstrap_servers: str,
        events_topic: str,
        production_topic: str,
        poll_timeout_s: float = 0.5,
    ) -> None:
        self.registry = registry
        self.events_topic = events_topic
        self.production_topic = production_topic
        self.follower = TopicFollower(
            "demand-follower",
            bootstrap_servers,
            (events_topic, production_topic),
            self._handle,
            start_at="earliest",
            poll_timeout_s=poll_timeout_s,
        )

    def start(self) -> None:
        self.follower.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.follower.stop(timeout_s)

    def topic_followers(self) -> list[TopicFollower]:
        return [self.follower]

    def apply(self, topic: str, value: bytes) -> None:
        """Apply one message of either followed topic to the registry; raises on a message it cannot use (the
        follower logs, counts and skips it)."""
        if topic == self.production_topic:
            order = ProductionOrder.model_validate_json(value)
            self.registry.record_production(order.design_id, order.net_orders, order.ts)
            return
        try:
            event = parse_event(value, now=float("inf"))
        except InvalidEvent as exc:
            logger.debug("demand follower skips an invalid event (the worker dead-letters it): %s", exc.reason)
            return
        if isinstance(event, Order):
            self.registry.record_order(event)
        elif isinstance(event, Return):
            self.registry.record_return(event)

    def _handle(self, record: FollowedRecord) -> None:
        self.apply(record.topic, record.value)


MAX_DESIGNS_PAGE = 200  # designs one GET /designs page holds at most


def encode_cursor(created_ts: float, design_id: str) -> str:
    """An opaque page cursor: the position (creation time, id) of the page's last design."""
    return base64.urlsafe_b64encode(json.dumps([created_ts, design_id]).encode()).decode()


def decode_cursor(cursor: str | None) -> tuple[float, str] | None:
    """The position a cursor of :func:`encode_cursor` names; a cursor it did not make is 422 naming ``cursor``."""
    if cursor is None:
        return None
    try:
        created_ts, design_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_ts), str(design_id)
    except (ValueError, TypeError) as exc:
        raise Refusal(
            "invalid-request",
            "cursor: not a cursor this service made; pass next_cursor of the previous page",
            "cursor",
        ) from exc
