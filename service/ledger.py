"""What the service served and accepted, so that a posted event can be checked against it: the ledger, in sqlite.

- **Impressions** the service served (``POST /designs/{id}/candidates``): to whom, of which design, which images.
  A click, order or return must name one of them, shown to its user, and one of its candidates.
- **Event ids**: every id of an event the service produced (designs, impressions) or accepted. A posted event id
  is used once; a reused one is refused (409), so that no event can suppress another of the same id downstream,
  where the worker and the demand view drop repeated ids.
- **Orders** the service accepted, with their shopper, impression, image and quantity, and the **returns** of each:
  a return names an order of the same shopper and never takes back more than is left of it.

The ledger is written before the event is produced, in one ``BEGIN IMMEDIATE`` transaction with each check
(:meth:`~service.sqlite_store.SqliteStore.transaction`), so two requests cannot both take the last unit of an order
or the same id, whether they reach one replica of the service or two; when Kafka then refuses the event,
:meth:`EventLedger.withdraw` takes it back out, and nothing is kept that the topic never heard of. It lives in the
service's store with the designs (``ServiceSettings.store_url``), shared by every replica, and survives restarts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from perfusion.contracts.records import Click, DesignCreated, Impression, Order, Return, Select
from service.problems import Refusal
from service.sqlite_store import SqliteStore, sqlite_path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS event_ids (
    event_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    user_id TEXT NOT NULL,
    recorded_ts REAL NOT NULL  -- the service's clock when it was produced or accepted
);
CREATE TABLE IF NOT EXISTS impressions (
    impression_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    design_id TEXT NOT NULL,
    ts REAL NOT NULL
);
-- Image ids are content hashes: the same pixels served twice (one seed, two viewers the model sees alike) are one
-- image in two impressions.
CREATE TABLE IF NOT EXISTS impression_images (
    impression_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (impression_id, image_id)
);
CREATE INDEX IF NOT EXISTS impressions_by_image ON impression_images (image_id);
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY,  -- the Order's event_id
    user_id TEXT NOT NULL,
    impression_id TEXT NOT NULL,
    design_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    quantity INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS returns (
    return_id TEXT PRIMARY KEY,  -- the Return's event_id
    order_id TEXT NOT NULL,
    quantity INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS returns_by_order ON returns (order_id);
"""

PostedEvent = Click | Order | Return | Select


@dataclass(frozen=True)
class ServedImpression:
    impression_id: str
    user_id: str
    design_id: str
    ts: float
    image_ids: tuple[str, ...]


@dataclass(frozen=True)
class AcceptedOrder:
    order_id: str
    user_id: str
    impression_id: str
    design_id: str
    image_id: str
    quantity: int
    returned: int  # units of it returned so far

    @property
    def remaining(self) -> int:
        return self.quantity - self.returned


class EventLedger(SqliteStore):
    """Impressions served and events accepted, in the service's store; safe to share between request threads and
    between the processes of the service's replicas."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    @classmethod
    def from_url(cls, url: str) -> EventLedger:
        """The ledger in the store a URL names (``sqlite:///<path>``; another scheme is a ConfigError)."""
        return cls(sqlite_path(url))

    # -------------------------------------------------------------------------------------- what the service made

    def record_design_created(self, event: DesignCreated) -> None:
        with self._lock:
            self._connection.execute(
                "INSERT INTO event_ids VALUES (?, ?, ?, ?)", (event.event_id, event.kind, event.user_id, time.time())
            )

    def record_impression(self, impression: Impression) -> None:
        """Keep an impression about to be produced (its id, viewer, design and candidates)."""
        with self.transaction():
            self._connection.execute(
                "INSERT INTO event_ids VALUES (?, ?, ?, ?)",
                (impression.event_id, impression.kind, impression.user_id, time.time()),
            )
            self._connection.execute(
                "INSERT INTO impressions VALUES (?, ?, ?, ?)",
                (impression.event_id, impression.user_id, impression.design_id, impression.ts),
            )
            self._connection.executemany(
                "INSERT INTO impression_images VALUES (?, ?, ?)",
                [(impression.event_id, candidate.image_id, candidate.position) for candidate in impression.candidates],
            )

    def impression(self, impression_id: str) -> ServedImpression | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT impression_id, user_id, design_id, ts FROM impressions WHERE impression_id = ?",
                (impression_id,),
            ).fetchone()
            if row is None:
                return None
            images = self._connection.execute(
                "SELECT image_id FROM impression_images WHERE impression_id = ? ORDER BY position", (impression_id,)
            ).fetchall()
        impression_id, user_id, design_id, ts = row
        return ServedImpression(impression_id, user_id, design_id, float(ts), tuple(image_id for (image_id,) in images))

    def impressions_of_image(self, image_id: str) -> list[ServedImpression]:
        """The impressions that served this image (none when this service never served it)."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT impression_id FROM impression_images WHERE image_id = ?", (image_id,)
            ).fetchall()
        found = [self.impression(impression_id) for (impression_id,) in rows]
        return [served for served in found if served is not None]

    # ----------------------------------------------------------------------------------------- what it accepted

    def order(self, order_id: str) -> AcceptedOrder | None:
        with self._lock:
            return self._order(order_id)

    def _order(self, order_id: str) -> AcceptedOrder | None:
        row = self._connection.execute(
            "SELECT order_id, user_id, impression_id, design_id, image_id, quantity FROM orders WHERE order_id = ?",
            (order_id,),
        ).fetchone()
        if row is None:
            return None
        (returned,) = self._connection.execute(
            "SELECT COALESCE(SUM(quantity), 0) FROM returns WHERE order_id = ?", (order_id,)
        ).fetchone()
        order_id, user_id, impression_id, design_id, image_id, quantity = row
        return AcceptedOrder(order_id, user_id, impression_id, design_id, image_id, int(quantity), int(returned))

    def admit(self, event: PostedEvent) -> None:
        """Keep a posted event, checked in the same step: its id unused (409), and a return within what is left of
        its order (422). The caller has checked everything that cannot change between requests."""
        with self.transaction():
            used = self._connection.execute(
                "SELECT kind FROM event_ids WHERE event_id = ?", (event.event_id,)
            ).fetchone()
            if used is not None:
                raise Refusal(
                    "duplicate-event-id",
                    f"event_id: {event.event_id!r} was used by an earlier event; send a new unique id, or leave "
                    "event_id out and the service assigns one",
                    field="event_id",
                )
            if isinstance(event, Return):
                order = self._order(event.order_id)
                remaining = 0 if order is None else order.remaining
                if event.quantity > remaining:
                    raise Refusal(
                        "quantity-out-of-bounds",
                        f"quantity: returning {event.quantity} units exceeds what is left of order "
                        f"{event.order_id!r} ({remaining} of {0 if order is None else order.quantity}); return at "
                        f"most {remaining}",
                        field="quantity",
                    )
            self._connection.execute(
                "INSERT INTO event_ids VALUES (?, ?, ?, ?)", (event.event_id, event.kind, event.user_id, time.time())
            )
            if isinstance(event, Order):
                self._connection.execute(
                    "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        event.event_id,
                        event.user_id,
                        event.impression_id,
                        event.design_id,
                        event.image_id,
                        event.quantity,
                    ),
                )
            elif isinstance(event, Return):
                self._connection.execute(
                    "INSERT INTO returns VALUES (?, ?, ?)", (event.event_id, event.order_id, event.quantity)
                )

    def withdraw(self, event_id: str) -> None:
        """Forget an event that could not be produced (impression, design or posted event), so nothing half-exists
        and the client may send it again with the same id."""
        with self.transaction():
            for statement in (
                "DELETE FROM event_ids WHERE event_id = ?",
                "DELETE FROM impression_images WHERE impression_id = ?",
                "DELETE FROM impressions WHERE impression_id = ?",
                "DELETE FROM orders WHERE order_id = ?",
                "DELETE FROM returns WHERE return_id = ?",
            ):
                self._connection.execute(statement, (event_id,))
