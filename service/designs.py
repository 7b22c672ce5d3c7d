"""The design registry: merchants' designs and the demand they have gathered, in the service's shared store.

Designs are written by ``POST /designs`` and belong to their merchant (who may read them: ``service.access``); what
the service served and accepted for them is its ledger (``service.ledger``). Both live in the store named by
``ServiceSettings.store_url`` (:mod:`service.sqlite_store`), so every replica of the service pointed at it lists,
reads and draws the same designs.

Demand (net orders, whether the threshold was reached, whether production was triggered) is *not* computed by the
service: events also reach Kafka from other producers, and the stream worker's demand agent is the one authority
that counts them and fires production exactly once. It sends each design's demand, whenever it changes, as a
:class:`~perfusion.contracts.records.DesignDemand` to ``perfusion.design-demand``: keyed by design id and compacted,
so the topic holds the latest state of every design. The service follows that topic with :class:`DemandFollower`
(a :class:`~perfusion.follower.TopicFollower` started by the service) into the store's ``design_demand`` table,
keeping per design the record of the highest offset it has seen: every replica follows the topic, and a replica
that starts again (reading the compacted topic from the start: one record per design, not every event) never
writes an older state over a newer one.

``GET /designs/{id}`` therefore reports what the worker had counted when it last published, as far as the follower
has read: it lags the worker's counting (its event-time watermark) and the follower's poll interval (about a
second). A record that cannot be used (malformed, hostile, of another kind) is logged with topic[partition]@offset,
counted, and skipped; the follower goes on with the next one, so one poison record never freezes the view.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfusion.contracts.records import DesignDemand
from perfusion.contracts.topics import TopicNames
from perfusion.errors import PerfusionError
from perfusion.follower import FollowedRecord, TopicFollower
from service.problems import Refusal
from service.settings import ServiceSettings
from service.sqlite_store import SqliteStore, sqlite_path

if TYPE_CHECKING:
    from perfusion.settings import KafkaSecuritySettings

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS designs (
    design_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    order_threshold INTEGER NOT NULL,
    created_ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS designs_by_merchant ON designs (merchant_id);
CREATE TABLE IF NOT EXISTS design_demand (
    design_id TEXT PRIMARY KEY,
    net_orders INTEGER NOT NULL,
    threshold INTEGER,
    threshold_reached INTEGER NOT NULL,
    production_triggered INTEGER NOT NULL,
    production_ts REAL,
    source_partition INTEGER NOT NULL,  -- where the record was read on the demand topic
    source_offset INTEGER NOT NULL
);
"""

# Keep a design's demand record unless the one kept is of a later offset of the same partition (a key is always on
# one partition; another partition means another topic, whose record is taken).
_KEEP_DEMAND = """
INSERT INTO design_demand VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (design_id) DO UPDATE SET
    net_orders = excluded.net_orders,
    threshold = excluded.threshold,
    threshold_reached = excluded.threshold_reached,
    production_triggered = excluded.production_triggered,
    production_ts = excluded.production_ts,
    source_partition = excluded.source_partition,
    source_offset = excluded.source_offset
WHERE excluded.source_partition != design_demand.source_partition
    OR excluded.source_offset > design_demand.source_offset
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
    """What the worker's demand topic said about one design (nothing yet: no orders, nothing triggered)."""

    design: Design
    net_orders: int
    threshold_reached: bool
    production_triggered: bool
    production_ts: float | None


class DesignRegistry(SqliteStore):
    """Designs and their demand in the service's store; safe to share between the request threads, the follower
    and other processes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    @classmethod
    def from_url(cls, url: str) -> DesignRegistry:
        """The registry in the store a URL names (``sqlite:///<path>``; another scheme is a ConfigError)."""
        return cls(sqlite_path(url))

    @classmethod
    def default(cls, settings: ServiceSettings | None = None) -> DesignRegistry:
        """The registry in the store of ``settings`` (default: :meth:`ServiceSettings.from_env`)."""
        return cls.from_url((settings or ServiceSettings.from_env()).resolved_store_url())

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

    def record_demand(self, demand: DesignDemand, partition: int, offset: int) -> bool:
        """Keep a design's demand as read at ``partition``/``offset`` of the demand topic; False when the kept one
        is of a later offset (a replica reading the topic again from the start)."""
        with self._lock:
            cursor = self._connection.execute(
                _KEEP_DEMAND,
                (
                    demand.design_id,
                    demand.net_orders,
                    demand.threshold,
                    demand.threshold_reached,
                    demand.production_triggered,
                    demand.production_ts,
                    partition,
                    offset,
                ),
            )
        return cursor.rowcount == 1

    def status(self, design_id: str) -> DemandStatus:
        design = self.get(design_id)
        with self._lock:
            row = self._connection.execute(
                "SELECT net_orders, threshold_reached, production_triggered, production_ts FROM design_demand "
                "WHERE design_id = ?",
                (design_id,),
            ).fetchone()
        # No record yet: the worker has counted nothing for it (no orders, nothing triggered).
        net_orders, reached, triggered, production_ts = row if row is not None else (0, False, False, None)
        return DemandStatus(
            design=design,
            net_orders=int(net_orders),
            threshold_reached=bool(reached),
            production_triggered=bool(triggered),
            production_ts=None if production_ts is None else float(production_ts),
        )


class DemandFollower:
    """Follows the worker's demand topic into a :class:`DesignRegistry`, on a daemon thread.

    ``topics``: the design-demand topic, or any topics of the loop (as ``perfusion serve`` names its events and
    production-orders topics): the follower follows the design-demand topic of their prefix."""

    def __init__(
        self,
        registry: DesignRegistry,
        bootstrap_servers: str,
        *topics: str,
        poll_timeout_s: float = 0.5,
        security: KafkaSecuritySettings | None = None,
    ) -> None:
        self.registry = registry
        self.demand_topic = TopicNames.of_topic(*topics).design_demand
        self.follower = TopicFollower(
            "demand-follower",
            bootstrap_servers,
            (self.demand_topic,),
            self._handle,
            start_at="earliest",
            poll_timeout_s=poll_timeout_s,
            security=security,
        )

    def start(self) -> None:
        self.follower.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.follower.stop(timeout_s)

    def topic_followers(self) -> list[TopicFollower]:
        return [self.follower]

    def apply(self, value: bytes, partition: int = 0, offset: int = 0) -> bool:
        """Keep one record of the demand topic; raises on a record it cannot use (the follower logs, counts and
        skips it). False when a later record of the design was kept already."""
        return self.registry.record_demand(DesignDemand.model_validate_json(value), partition, offset)

    def _handle(self, record: FollowedRecord) -> None:
        self.apply(record.value, record.partition, record.offset)


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
