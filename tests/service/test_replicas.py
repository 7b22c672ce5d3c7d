"""Two ``perfusion serve`` replicas on one broker share one truth (against the real broker, the real worker).

Each replica has a state folder of its own; what they share is named by URL only: the store
(``PERFUSION_SERVE_STORE_URL``: designs, the ledger, the demand view, the key file beside it) and the image store
(``PERFUSION_IMAGES_URL``). A design created through replica 1 is listed, read, drawn and selected through replica
2; a shopper's impression served by replica 1 is clicked and ordered (by the order system) through replica 2 up to
the design's threshold; the worker fires production once; and both replicas report the same status, which they
follow from the worker's compacted design-demand topic.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaConsumer

from harness.infra.process import free_port
from harness.loop import LoopPlace, cli_arguments, process_environment
from harness.processes import ProcessSupervisor
from perfusion.contracts.records import ProductionOrder
from perfusion.contracts.topics import TopicNames, ensure_topics
from service.auth import IssuedKey, KeyStore
from service.sqlite_store import sqlite_url

pytestmark = [pytest.mark.integration, pytest.mark.slow]

THRESHOLD = 3
STARTUP_TIMEOUT_S = 420.0
PRODUCTION_TIMEOUT_S = 240.0
DEMAND_IDLE_AFTER_S = 3  # with no traffic after the last order, the demand agent moves event time on after this


@dataclass(frozen=True)
class Replicas:
    urls: tuple[str, str]
    topics: TopicNames
    bootstrap: str
    keys: dict[str, IssuedKey]
    supervisors: tuple[ProcessSupervisor, ...]

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """``condition()``'s first truthy value, polled until ``timeout_s``; fails early if a process exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            for supervisor in self.supervisors:
                supervisor.check_running()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)


@pytest.fixture
def replicas(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Replicas]:
    from perfusion.feature_store import apply_feature_repo

    shared = tmp_path / "shared"
    topic_prefix = f"replicas-{uuid.uuid4().hex[:8]}."
    topics = TopicNames.for_prefix(topic_prefix)
    feast_dir = tmp_path / "feast"
    urls = {
        "PERFUSION_SERVE_STORE_URL": sqlite_url(shared / "service.sqlite"),
        "PERFUSION_IMAGES_URL": f"file://{shared / 'images'}",
    }
    store = KeyStore(shared / "keys.json")  # beside the store: where both replicas look for keys
    keys = {
        "merchant": store.create("merchant", "m-1"),
        "shopper": store.create("shopper", "shopper-1"),
        "order_system": store.create("order_system", "shop-orders"),
    }

    def place(name: str, extra: dict[str, str]) -> dict[str, str]:
        return LoopPlace(
            kafka_bootstrap, state_dir=tmp_path / name, topic_prefix=topic_prefix, partitions=1, feast_dir=feast_dir,
            online_store="sqlite", extra_environment={"OMP_NUM_THREADS": "1", **extra},
        ).environment()  # fmt: skip

    with process_environment({"PERFUSION_FEAST_DIR": str(feast_dir), "FEAST_USAGE": "False"}):
        apply_feature_repo()
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    ports = (free_port(), free_port())
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(ProcessSupervisor(tmp_path / "logs-worker", place("worker", {})))
        worker.start(
            "worker",
            cli_arguments(
                "worker", "--demand-allowed-lateness-s=1", f"--demand-idle-after-s={DEMAND_IDLE_AFTER_S}",
                "--group-window-s=30", "--group-allowed-lateness-s=1",
            ),
        )  # fmt: skip
        services = []
        for number, port in enumerate(ports, start=1):
            supervisor = stack.enter_context(
                ProcessSupervisor(tmp_path / f"logs-replica-{number}", place(f"replica-{number}", urls))
            )
            supervisor.start(f"replica-{number}", cli_arguments("serve", f"--port={port}", "--steps=2", "--poll=1"))
            services.append(supervisor)
        running = Replicas(
            urls=(f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"),
            topics=topics,
            bootstrap=kafka_bootstrap,
            keys=keys,
            supervisors=(worker, *services),
        )
        for url in running.urls:
            running.wait(lambda url=url: _answers(f"{url}/healthz"), STARTUP_TIMEOUT_S, f"{url}/healthz")
        yield running
    for log in sorted(tmp_path.glob("logs-*/*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def production_orders(bootstrap: str, topic: str, design_id: str) -> list[ProductionOrder]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    found: list[ProductionOrder] = []
    try:
        for _ in range(6):
            for messages in consumer.poll(timeout_ms=500).values():
                found += [ProductionOrder.model_validate_json(message.value) for message in messages]
    finally:
        consumer.close()
    return [order for order in found if order.design_id == design_id]


def test_two_replicas_on_one_store_serve_one_truth_and_the_worker_fires_once(replicas: Replicas) -> None:
    one, two = (httpx.Client(base_url=url, timeout=120.0) for url in replicas.urls)
    merchant, shopper, orders = (replicas.keys[role].authorization for role in ("merchant", "shopper", "order_system"))

    created = one.post("/designs", json={"prompt": "a red striped t-shirt", "order_threshold": THRESHOLD},
                       headers=merchant)  # fmt: skip
    assert created.status_code == 201, created.text
    design_id = created.json()["design_id"]

    # Created on 1: listed, read, drawn and selected on 2.
    assert [design["design_id"] for design in two.get("/designs", headers=merchant).json()["designs"]] == [design_id]
    status = two.get(f"/designs/{design_id}", headers=merchant)
    assert status.status_code == 200 and status.json()["order_threshold"] == THRESHOLD, status.text
    review = two.post(f"/designs/{design_id}/candidates", json={"k": 2, "seed": 1}, headers=merchant)
    assert review.status_code == 200, review.text
    reviewed = review.json()
    select = {"kind": "select", "impression_id": reviewed["impression_id"], "design_id": design_id,
              "image_ids": [reviewed["candidates"][0]["image_id"]]}  # fmt: skip
    assert two.post("/events", json=select, headers=merchant).status_code == 202

    # A shopper's impression served by 1: its image read, clicked and ordered through 2, up to the threshold.
    served = one.post(f"/designs/{design_id}/candidates", json={"k": 2, "seed": 2}, headers=shopper)
    assert served.status_code == 200, served.text
    impression = served.json()
    image_id = impression["candidates"][1]["image_id"]
    picture = two.get(f"/images/{image_id}", headers=shopper)
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    base = {"impression_id": impression["impression_id"], "design_id": design_id, "image_id": image_id}
    assert two.post("/events", json={"kind": "click", **base}, headers=shopper).status_code == 202
    order_ids = []
    for _ in range(THRESHOLD):
        order_id = f"order-{uuid.uuid4().hex}"
        body = {"kind": "order", "event_id": order_id, "user_id": "shopper-1", "quantity": 1, **base}
        accepted = two.post("/events", json=body, headers=orders)
        assert accepted.status_code == 202, accepted.text
        assert one.post("/events", json=body, headers=orders).status_code == 409  # the id is used, on every replica
        order_ids.append(order_id)

    def same_triggered_status() -> dict[str, Any] | None:
        statuses = [client.get(f"/designs/{design_id}", headers=merchant).json() for client in (one, two)]
        triggered = all(status.get("production_triggered") for status in statuses)
        return statuses[0] if triggered and statuses[0] == statuses[1] else None

    status = replicas.wait(same_triggered_status, PRODUCTION_TIMEOUT_S, "both replicas to report production")
    assert status["net_orders"] == THRESHOLD and status["production_ts"] is not None
    assert replicas.topics.design_demand in status["demand_source"]
    fired = production_orders(replicas.bootstrap, replicas.topics.production_orders, design_id)
    assert [(order.net_orders, order.threshold) for order in fired] == [(THRESHOLD, THRESHOLD)]  # once
