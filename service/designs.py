"""The design registry: merchants' designs and the demand they have gathered, in sqlite under ``state_dir()``.

Designs are written by ``POST /designs``. Demand (net orders and whether production was triggered) is *not*
computed by the service from its own requests: events also reach Kafka from other producers, and the stream
worker's demand agent is the one authority that fires production exactly once. So the service follows the
topics with :class:`DemandFollower`, a kafka-python consumer thread started by the service:

- ``perfusion.events``: every Order adds its quantity, every Return subtracts it; both are deduplicated by
  event id, so a replayed topic does not count twice;
- ``perfusion.production-orders``: the demand agent's ProductionOrder marks the design as triggered.

``GET /designs/{id}`` therefore reports what the topics said up to the follower's position, which lags the
events by the follower's poll interval (about a second). The follower keeps no consumer group: it reads both
topics from the beginning at every start and relies on the event-id deduplication above.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from perfusion.contracts.records import InvalidEvent, Order, ProductionOrder, Return, parse_event
from perfusion.errors import PerfusionError
from perfusion.paths import state_dir

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS designs (
    design_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    order_threshold INTEGER NOT NULL,
    created_ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS demand (
    event_id TEXT PRIMARY KEY,
    design_id TEXT NOT NULL,
    quantity INTEGER NOT NULL  -- positive for an order, negative for a return
);
CREATE INDEX IF NOT EXISTS demand_by_design ON demand (design_id);
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


class DesignRegistry:
    """Designs and their demand in one sqlite file; safe to share between the request threads and the follower."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.executescript(_SCHEMA)

    @classmethod
    def default(cls) -> DesignRegistry:
        return cls(state_dir() / "service" / "designs.sqlite")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

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

    def exists(self, design_id: str) -> bool:
        with self._lock:
            row = self._connection.execute("SELECT 1 FROM designs WHERE design_id = ?", (design_id,)).fetchone()
        return row is not None

    def record_demand(self, event_id: str, design_id: str, quantity: int) -> bool:
        """Count an order (quantity > 0) or a return (quantity < 0) once; False if ``event_id`` was seen before."""
        with self._lock:
            cursor = self._connection.execute(
                "INSERT OR IGNORE INTO demand VALUES (?, ?, ?)", (event_id, design_id, quantity)
            )
        return cursor.rowcount == 1

    def record_production(self, design_id: str, net_orders: int, ts: float) -> None:
        with self._lock:
            self._connection.execute("INSERT OR IGNORE INTO production VALUES (?, ?, ?)", (design_id, net_orders, ts))

    def status(self, design_id: str) -> DemandStatus:
        design = self.get(design_id)
        with self._lock:
            (net_orders,) = self._connection.execute(
                "SELECT COALESCE(SUM(quantity), 0) FROM demand WHERE design_id = ?", (design_id,)
            ).fetchone()
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
        self.bootstrap_servers = bootstrap_servers
        self.events_topic = events_topic
        self.production_topic = production_topic
        self.poll_timeout_s = poll_timeout_s
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demand-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def apply(self, topic: str, value: bytes) -> None:
        """Apply one message of either followed topic to the registry (unusable messages are logged, skipped)."""
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
            self.registry.record_demand(event.event_id, event.design_id, event.quantity)
        elif isinstance(event, Return):
            self.registry.record_demand(event.event_id, event.design_id, -event.quantity)

    def _run(self) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        consumer: KafkaConsumer | None = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(
                        self.events_topic,
                        self.production_topic,
                        bootstrap_servers=self.bootstrap_servers,
                        group_id=None,
                        auto_offset_reset="earliest",
                        enable_auto_commit=False,
                        client_id="perfusion-service-demand",
                    )
                batches = consumer.poll(timeout_ms=int(self.poll_timeout_s * 1000))
                for partition, messages in batches.items():
                    for message in messages:
                        try:
                            self.apply(partition.topic, message.value)
                        except ValueError as exc:
                            logger.warning(
                                "demand follower skips %s[%d]@%d: %s",
                                partition.topic,
                                partition.partition,
                                message.offset,
                                exc,
                            )
            except KafkaError as exc:
                self.errors += 1
                logger.warning("demand follower lost Kafka at %s (%s); retrying in 1 s", self.bootstrap_servers, exc)
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()
