"""The generator service against the real broker: designs, candidates and events land on the topic, keyed by user;
orders followed back from the topic show up in GET /designs/{id}."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from kafka import KafkaConsumer

from perfusion.contracts.records import parse_event
from perfusion.contracts.topics import TopicNames, ensure_topics
from perfusion.image_store import ImageStore
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import TextEncoder
from service.app import create_app
from service.designs import DemandFollower, DesignRegistry
from service.events import KafkaEventSink
from service.features import FeastFeatureReader
from service.generator import PersonalizedGenerator


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[tuple[bytes, Any]]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    records: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=500).values():
                records += [(message.key, parse_event(message.value)) for message in messages]
    finally:
        consumer.close()
    return records


@pytest.mark.slow
def test_design_candidates_and_events_reach_kafka(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perfusion.feature_store import apply_feature_repo, open_feature_store

    topics = TopicNames.for_prefix(topic_prefix)
    ensure_topics(kafka_bootstrap, topics, partitions=2)
    monkeypatch.setenv("PERFUSION_FEAST_DIR", str(tmp_path / "feast"))
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
    app = create_app(
        generator=generator,
        event_sink=sink,
        feature_reader=FeastFeatureReader(open_feature_store()),
        designs=designs,
        images=ImageStore(tmp_path / "images"),
        events_topic=topics.events,
        production_topic=topics.production_orders,
        background=(follower,),
    )
    with TestClient(app) as client:
        created = client.post("/designs", json={"merchant_id": "m-7", "prompt": "a teal hoodie", "order_threshold": 5})
        assert created.status_code == 201, created.text
        design_id = created.json()["design_id"]
        served = client.post(f"/designs/{design_id}/candidates", json={"user_id": "shopper-3", "k": 4, "seed": 1})
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
        assert client.post("/events", content=json.dumps(order)).status_code == 202
        # Posting the same order twice is produced twice but counted once.
        assert client.post("/events", content=json.dumps(order)).status_code == 202

        records = read_topic(kafka_bootstrap, topics.events, expected=4)
        kinds = [event.kind for _, event in records]
        assert sorted(kinds) == ["design", "impression", "order", "order"]
        impression = next(event for _, event in records if event.kind == "impression")
        assert impression.event_id == body["impression_id"] and impression.model_version == "base"
        assert [c.image_id for c in impression.candidates] == [c["image_id"] for c in body["candidates"]]
        keys = {event.kind: key for key, event in records}
        assert keys["impression"] == keys["order"] == b"shopper-3" and keys["design"] == b"m-7"

        deadline = time.monotonic() + 30
        status = client.get(f"/designs/{design_id}").json()
        while status["net_orders"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            status = client.get(f"/designs/{design_id}").json()
        assert status["net_orders"] == 2 and status["production_triggered"] is False
    sink.close()
