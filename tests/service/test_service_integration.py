"""The generator service against the real broker: designs, candidates and events land on the topic, keyed by user;
orders counted by the real worker and followed back from its demand topic show up in GET /designs/{id}; and no
refused request (no key, wrong role, someone else's order, a reused id, a bad clock, an impression never served)
puts anything on the topic."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kafka import KafkaConsumer

from harness.loop import LoopPlace, cli_arguments, loop_process
from perfusion.contracts.records import parse_event
from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.image_store import ImageStore
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import TextEncoder
from service.app import create_app
from service.auth import KeyStore
from service.designs import DemandFollower, DesignRegistry
from service.events import KafkaEventSink
from service.features import FeastFeatureReader
from service.generator import PersonalizedGenerator


def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0, until: str | None = None
) -> list[tuple[bytes, Any]]:
    """The topic's events from the start: ``expected`` of them, or up to the one with event id ``until``."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    records: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=500).values():
                records += [(message.key, parse_event(message.value)) for message in messages]
            if until is not None and any(event.event_id == until for _, event in records):
                break
    finally:
        consumer.close()
    return records


def tiny_service(
    kafka_bootstrap: str, topics: TopicNames, tmp_path: Path, background: bool
) -> tuple[FastAPI, KeyStore, KafkaEventSink]:
    """The app on tiny seeded models, producing to the real topic (following demand when ``background``), its key
    store and its sink (to close)."""
    from perfusion.feature_store import apply_feature_repo, open_feature_store

    apply_feature_repo()
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    adaptive = AdaptiveNetwork(unet, AdaptiveConfig(condition_hidden=16, condition_channels=4))
    classifier = AttributeClassifier(AttributeClassifierConfig(channels=(8, 16)))
    generator = PersonalizedGenerator(
        unet, adaptive, TextEncoder(), classifier, QUICK_CONFIG, sampler=SamplerConfig(steps=2)
    )
    designs = DesignRegistry(tmp_path / "designs.sqlite")
    sink = KafkaEventSink(kafka_bootstrap, topics.events)
    follower = DemandFollower(designs, kafka_bootstrap, topics.events, topics.production_orders, poll_timeout_s=0.2)
    keys = KeyStore(tmp_path / "keys.json")
    app = create_app(
        generator=generator,
        event_sink=sink,
        feature_reader=FeastFeatureReader(open_feature_store()),
        designs=designs,
        images=ImageStore(tmp_path / "images"),
        events_topic=topics.events,
        production_topic=topics.production_orders,
        background=(follower,) if background else (),
        keys=keys,
    )
    return app, keys, sink


@contextlib.contextmanager
def running_worker(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, partitions: int) -> Iterator[Any]:
    """``perfusion worker`` on the test's topics and Feast folder, with demand applied a few quiet seconds after an
    order (the service's demand view is what its demand agent publishes)."""
    place = LoopPlace(
        kafka_bootstrap, state_dir=tmp_path / "worker", topic_prefix=topic_prefix, partitions=partitions,
        feast_dir=tmp_path / "feast", online_store="sqlite", extra_environment={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    arguments = cli_arguments("worker", "--demand-allowed-lateness-s=1", "--demand-idle-after-s=2")
    with loop_process(place, "worker", arguments, tmp_path, stop_grace_s=60.0) as worker:
        yield worker.process
    print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


@pytest.mark.slow
def test_design_candidates_and_events_reach_kafka(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=2)
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "feast"))
    app, keys, sink = tiny_service(kafka_bootstrap, topics, tmp_path, background=True)
    merchant = keys.create("merchant", "m-7").authorization
    shopper = keys.create("shopper", "shopper-3").authorization
    order_system = keys.create("order_system", "shop-orders").authorization
    with running_worker(kafka_bootstrap, topic_prefix, tmp_path, partitions=2) as worker, TestClient(app) as client:
        created = client.post("/designs", json={"prompt": "a teal hoodie", "order_threshold": 5}, headers=merchant)
        assert created.status_code == 201, created.text
        design_id = created.json()["design_id"]
        served = client.post(f"/designs/{design_id}/candidates", json={"k": 4, "seed": 1}, headers=shopper)
        assert served.status_code == 200, served.text
        body = served.json()
        image_id = body["candidates"][2]["image_id"]
        order = {
            "kind": "order",
            "event_id": f"order-{uuid.uuid4().hex}",
            "ts": time.time(),
            "user_id": "shopper-3",
            "impression_id": body["impression_id"],
            "design_id": design_id,
            "image_id": image_id,
            "quantity": 2,
        }
        assert client.post("/events", content=json.dumps(order), headers=order_system).status_code == 202
        # The same order posted again is refused: its id was used.
        assert client.post("/events", content=json.dumps(order), headers=order_system).status_code == 409

        records = read_topic(kafka_bootstrap, topics.events, expected=3)
        kinds = [event.kind for _, event in records]
        assert sorted(kinds) == ["design", "impression", "order"]
        impression = next(event for _, event in records if event.kind == "impression")
        assert impression.event_id == body["impression_id"] and impression.model_version == "base"
        assert [c.image_id for c in impression.candidates] == [c["image_id"] for c in body["candidates"]]
        keys = {event.kind: key for key, event in records}
        assert keys["impression"] == keys["order"] == b"shopper-3" and keys["design"] == b"m-7"

        # The worker (starting meanwhile) counts the order; its demand agent's record comes back to the service.
        deadline = time.monotonic() + 300
        status = client.get(f"/designs/{design_id}", headers=merchant).json()
        while status["net_orders"] < 2 and time.monotonic() < deadline:
            assert worker.poll() is None, "the worker exited"
            time.sleep(0.5)
            status = client.get(f"/designs/{design_id}", headers=merchant).json()
        assert status["net_orders"] == 2 and status["production_triggered"] is False
    sink.close()


@pytest.mark.slow
def test_no_refused_request_reaches_kafka(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=1)
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "feast"))
    app, keys, sink = tiny_service(kafka_bootstrap, topics, tmp_path, background=False)
    merchant = keys.create("merchant", "m-1").authorization
    other_merchant = keys.create("merchant", "m-2").authorization
    shopper = keys.create("shopper", "shopper-1").authorization
    other_shopper = keys.create("shopper", "shopper-2").authorization
    order_system = keys.create("order_system", "shop-orders").authorization
    revoked = keys.create("order_system", "old-orders")
    keys.revoke(revoked.stored.key_id)
    with TestClient(app) as client:
        created = client.post("/designs", json={"prompt": "a red dress", "order_threshold": 2}, headers=merchant)
        design_id = created.json()["design_id"]
        shown = {}
        for seed, (user, headers) in enumerate((("shopper-1", shopper), ("shopper-2", other_shopper))):
            body = client.post(f"/designs/{design_id}/candidates", json={"k": 2, "seed": seed}, headers=headers).json()
            shown[user] = {"impression_id": body["impression_id"], "image_id": body["candidates"][0]["image_id"]}

        def posted(kind: str, **fields: Any) -> dict[str, Any]:
            """An event of shopper-1 on the first candidate shown to them; a refused one unless it names its id."""
            common = {"event_id": f"refused-{uuid.uuid4().hex}", "ts": time.time(), "user_id": "shopper-1"}
            return {"kind": kind, **common, "design_id": design_id, **shown["shopper-1"], **fields}

        kept = posted("order", event_id=f"kept-{uuid.uuid4().hex}", quantity=2)
        assert client.post("/events", json=kept, headers=order_system).status_code == 202
        theirs = posted("order", event_id=f"kept-{uuid.uuid4().hex}", user_id="shopper-2", **shown["shopper-2"])
        assert client.post("/events", json=theirs | {"quantity": 1}, headers=order_system).status_code == 202

        refusals: list[tuple[dict[str, Any], dict[str, str], int]] = [
            (posted("order", quantity=1000), {}, 401),  # anonymous
            (posted("order", quantity=1), revoked.authorization, 401),
            (posted("order", quantity=1), shopper, 403),  # shoppers do not report orders
            (posted("order", quantity=1), merchant, 403),
            (posted("order", quantity=1000), order_system, 422),
            (posted("order", quantity=1, impression_id="imp-never-served"), order_system, 422),
            (posted("order", quantity=1, user_id="shopper-2"), order_system, 422),  # shown to shopper-1
            (posted("order", quantity=1, ts=86_400.0), order_system, 422),  # stamped 1970
            (posted("order", quantity=1, event_id=kept["event_id"]), order_system, 409),
            (posted("return", order_id=kept["event_id"], quantity=3), order_system, 422),  # more than ordered
            (posted("return", order_id=theirs["event_id"], quantity=1), order_system, 422),  # shopper-2's order
            (posted("click"), other_shopper, 403),  # shopper-2 clicking for shopper-1
            (posted("select", user_id="m-2", image_ids=[shown["shopper-1"]["image_id"]]) | {"image_id": None},
             other_merchant, 403),  # m-2 selecting on m-1's design
        ]  # fmt: skip
        for body, headers, status in refusals:
            body = {name: value for name, value in body.items() if value is not None}
            response = client.post("/events", json=body, headers=headers)
            assert response.status_code == status, (body, response.text)
            assert response.headers["content-type"] == "application/problem+json"
        marker = posted("order", event_id=f"marker-{uuid.uuid4().hex}", quantity=1)
        assert client.post("/events", json=marker, headers=order_system).status_code == 202

    # The topic up to the marker, which was produced after every refusal: none of them is there.
    records = read_topic(kafka_bootstrap, topics.events, expected=10_000, until=marker["event_id"])
    ids = [event.event_id for _, event in records]
    assert marker["event_id"] in ids and ids.count(kept["event_id"]) == 1
    assert [event_id for event_id in ids if event_id.startswith("refused-")] == []
    kinds = sorted(event.kind for _, event in records)
    assert kinds == ["design", "impression", "impression", "order", "order", "order"]
    sink.close()


@pytest.mark.slow
def test_readyz_checks_the_real_broker_and_feast(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = TopicNames.for_prefix(topic_prefix)
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "feast"))
    app, _, sink = tiny_service(kafka_bootstrap, topics, tmp_path, background=False)
    try:
        with TestClient(app) as client:
            # The events topic does not exist yet: Kafka answers, and the check says what is missing.
            missing = client.get("/readyz")
            assert missing.status_code == 503, missing.text
            assert missing.json()["detail"].startswith(f"kafka: Kafka at {kafka_bootstrap} answered, but has no topic")
            ensure_topics(kafka_bootstrap, topics, partitions=2)
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            checks = {check["name"]: check for check in ready.json()["checks"]}
            assert checks["kafka"]["detail"] == f"{kafka_bootstrap} answered: {topics.events} has 2 partitions"
            assert checks["feast"]["ok"] and checks["model"]["ok"]
    finally:
        sink.close()
