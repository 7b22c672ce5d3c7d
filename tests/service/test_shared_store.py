"""Two replicas of the service on one store URL: designs, the ledger and keys shared; the store opened for two
processes (WAL, busy timeout, read-check-write in one transaction, so no event id or order unit is taken twice by
two processes); any URL but sqlite:/// refused naming the setting; and two apps on one store and one image store
serving each other's designs, impressions and images."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from perfusion.contracts.records import DesignDemand, Order, Return
from perfusion.errors import ConfigError
from perfusion.image_store import ImageStore
from perfusion.text_encoder import TextEncoder
from service.app import create_app
from service.auth import AuthSettings, KeyStore
from service.designs import DemandFollower, DesignRegistry
from service.ledger import EventLedger
from service.problems import Refusal
from service.settings import ServiceSettings
from service.sqlite_store import BUSY_TIMEOUT_S, sqlite_path, sqlite_url
from tests.service.test_service_api import EVENTS_TOPIC, PRODUCTION_TOPIC, NoFeatures, RecordingSink, tiny_generator

# --------------------------------------------------------------------------------------------------- the URL


@pytest.mark.parametrize(
    "url", ["postgresql://db/perfusion", "redis://localhost:6379", "/srv/service.sqlite", "sqlite://", "sqlite:///"]
)
def test_a_store_url_that_is_not_a_sqlite_file_is_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match=r"store_url .*supported: sqlite:///<path>"):
        ServiceSettings(store_url=url)


def test_the_store_url_defaults_under_the_state_folder_and_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERFUSION_STATE_DIR", str(tmp_path / "state"))
    assert ServiceSettings().resolved_store_url() == f"sqlite:///{tmp_path / 'state' / 'service' / 'service.sqlite'}"
    monkeypatch.setenv("PERFUSION_SERVE_STORE_URL", f"sqlite:///{tmp_path / 'shared.sqlite'}")
    registry = DesignRegistry.default()
    assert registry.path == tmp_path / "shared.sqlite"
    monkeypatch.setenv("PERFUSION_SERVE_STORE_URL", "mysql://db")
    with pytest.raises(ConfigError, match="PERFUSION_SERVE_STORE_URL"):
        DesignRegistry.default()
    assert sqlite_path("sqlite:///relative/service.sqlite") == Path("relative/service.sqlite")


def test_the_store_is_opened_for_two_processes(tmp_path: Path) -> None:
    registry = DesignRegistry(tmp_path / "service.sqlite")
    (mode,) = registry._connection.execute("PRAGMA journal_mode").fetchone()
    (timeout_ms,) = registry._connection.execute("PRAGMA busy_timeout").fetchone()
    assert mode == "wal" and timeout_ms == BUSY_TIMEOUT_S * 1000
    # Designs, the demand view and the ledger in one database, without a table of the same name.
    EventLedger(registry.path)
    tables = {name for (name,) in registry._connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"designs", "design_demand", "event_ids", "impressions", "orders", "returns"} <= tables


# ---------------------------------------------------------------------------------------- two processes


def _order(event_id: str, quantity: int = 5) -> Order:
    return Order(event_id=event_id, ts=time.time(), user_id="shopper-1", impression_id="imp-1", design_id="d-1",
                 image_id="gen-0123456789abcdef", quantity=quantity)  # fmt: skip


def _return(event_id: str, order_id: str) -> Return:
    return Return(event_id=event_id, ts=time.time(), user_id="shopper-1", order_id=order_id, impression_id="imp-1",
                  design_id="d-1", image_id="gen-0123456789abcdef", quantity=1)  # fmt: skip


def _admit_in_a_process(path: str, events: list[tuple[str, bytes]], start: Any, results: Any) -> None:
    """One replica's process: its own ledger on the shared file, admitting ``events`` once ``start`` is set."""
    ledger = EventLedger(Path(path))
    start.wait()
    for kind, raw in events:
        event = Order.model_validate_json(raw) if kind == "order" else Return.model_validate_json(raw)
        try:
            ledger.admit(event)
            results.put((event.event_id, "accepted"))
        except Refusal as refusal:
            results.put((event.event_id, refusal.problem.slug))


def test_two_processes_never_both_accept_one_event_id_nor_return_more_than_an_order(tmp_path: Path) -> None:
    path = tmp_path / "service.sqlite"
    ledger = EventLedger(path)
    ledger.admit(_order("order-1", quantity=5))
    same_ids = [("order", _order(f"order-{n}", quantity=1).to_bytes()) for n in range(2, 12)]
    returns = [[("return", _return(f"return-{side}-{n}", "order-1").to_bytes()) for n in range(6)] for side in "ab"]
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    processes = [
        context.Process(target=_admit_in_a_process, args=(str(path), same_ids + returns[side], start, results))
        for side in range(2)
    ]
    for process in processes:
        process.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in range(2 * (len(same_ids) + 6))]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for event_id in (f"order-{n}" for n in range(2, 12)):  # each id sent by both: accepted once, 409 once
        assert sorted(outcome for seen, outcome in outcomes if seen == event_id) == ["accepted", "duplicate-event-id"]
    returned = [outcome for seen, outcome in outcomes if seen.startswith("return-")]
    assert returned.count("accepted") == 5 and returned.count("quantity-out-of-bounds") == 7  # 12 units asked
    accepted = ledger.order("order-1")
    assert accepted is not None and accepted.returned == 5 and accepted.remaining == 0


def test_a_writer_waits_for_another_connections_transaction_instead_of_failing(tmp_path: Path) -> None:
    one, two = EventLedger(tmp_path / "service.sqlite"), EventLedger(tmp_path / "service.sqlite")
    blocker = sqlite3.connect(tmp_path / "service.sqlite", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a moment
    threading.Timer(0.5, lambda: blocker.execute("COMMIT")).start()
    started = time.monotonic()
    two.admit(_order("order-waited"))
    assert time.monotonic() - started >= 0.4
    assert one.order("order-waited") is not None


# ------------------------------------------------------------------------------------------ two apps, one store


def test_two_apps_on_one_store_and_one_image_store_serve_each_others_designs_and_impressions(
    tmp_path: Path, text_encoder: TextEncoder
) -> None:
    store_url = sqlite_url(tmp_path / "shared" / "service.sqlite")
    images_url = f"file://{tmp_path / 'images'}"
    generator = tiny_generator(text_encoder)
    sinks = [RecordingSink(), RecordingSink()]
    registries = [DesignRegistry.from_url(store_url) for _ in sinks]
    apps = [
        create_app(
            generator=generator, event_sink=sink, feature_reader=NoFeatures(), designs=registry,
            images=ImageStore(images_url), events_topic=EVENTS_TOPIC, production_topic=PRODUCTION_TOPIC,
            auth=AuthSettings(),
        )
        for sink, registry in zip(sinks, registries, strict=True)
    ]  # fmt: skip
    keys = KeyStore(tmp_path / "shared" / "keys.json")  # beside the store: both apps read it
    merchant, shopper = keys.create("merchant", "m-1"), keys.create("shopper", "shopper-1")
    orders = keys.create("order_system", "shop-orders")
    one, two = TestClient(apps[0]), TestClient(apps[1])

    created = one.post("/designs", json={"prompt": "a red striped t-shirt", "order_threshold": 2},
                       headers=merchant.authorization)  # fmt: skip
    assert created.status_code == 201, created.text
    design_id = created.json()["design_id"]
    listed = two.get("/designs", headers=merchant.authorization).json()["designs"]
    assert [design["design_id"] for design in listed] == [design_id]
    assert two.get(f"/designs/{design_id}", headers=merchant.authorization).json()["prompt"] == "a red striped t-shirt"

    drawn = two.post(f"/designs/{design_id}/candidates", json={"k": 2, "seed": 3}, headers=shopper.authorization)
    assert drawn.status_code == 200, drawn.text
    impression = drawn.json()
    image_id = impression["candidates"][0]["image_id"]
    picture = one.get(f"/images/{image_id}", headers=shopper.authorization)  # drawn on two, stored once
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")

    base = {"impression_id": impression["impression_id"], "design_id": design_id, "image_id": image_id}
    click = one.post("/events", json={"kind": "click", **base}, headers=shopper.authorization)
    assert click.status_code == 202, click.text
    order_id = f"order-{uuid.uuid4().hex}"
    order = {"kind": "order", "event_id": order_id, "user_id": "shopper-1", "quantity": 2, **base}
    assert one.post("/events", json=order, headers=orders.authorization).status_code == 202
    assert two.post("/events", json=order, headers=orders.authorization).status_code == 409  # the id was used on one
    back = {"kind": "return", "user_id": "shopper-1", "order_id": order_id, "quantity": 2, **base}
    assert two.post("/events", json=back, headers=orders.authorization).status_code == 202
    again = one.post("/events", json={**back, "quantity": 1}, headers=orders.authorization)
    assert again.status_code == 422 and "0 of 2" in again.json()["detail"]  # nothing left of it, on either

    # The demand follower of either replica fills the one view both read.
    demand = DesignDemand(design_id=design_id, net_orders=2, peak_net_orders=2, threshold=2, threshold_reached=True,
                          production_triggered=True, production_ts=1.0)  # fmt: skip
    DemandFollower(registries[1], "localhost:9", PRODUCTION_TOPIC).apply(demand.to_bytes(), partition=0, offset=0)
    statuses = [client.get(f"/designs/{design_id}", headers=merchant.authorization).json() for client in (one, two)]
    assert statuses[0] == statuses[1] and statuses[0]["production_triggered"] and statuses[0]["net_orders"] == 2
    assert "test.perfusion.design-demand" in statuses[0]["demand_source"]
    assert [event.kind for event in sinks[0].events + sinks[1].events].count("order") == 1
