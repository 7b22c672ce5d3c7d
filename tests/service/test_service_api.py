"""The generator service's HTTP API on tiny seeded models: validation, cold start, 404/503 paths, metrics.

The event sink here records what the app hands it (the app takes any EventSink); the Kafka path itself is tested
against the real broker in test_service_integration.py. User features come from a real Feast store in a temp dir.
"""

from __future__ import annotations

import datetime
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import Event, Impression
from perfusion.image_store import ImageStore
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import TextEncoder
from service.app import create_app
from service.designs import DesignRegistry
from service.events import EventSinkUnavailable
from service.features import FeastFeatureReader, FeatureStoreUnavailable
from service.generator import PersonalizedGenerator

EVENTS_TOPIC = "test.perfusion.events"
PRODUCTION_TOPIC = "test.perfusion.production-orders"
# The adaptive network's zero-initialised parts (ControlNet's zero convolutions).
ZERO_INIT_PARTS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


class RecordingSink:
    """An EventSink that keeps the events it is given, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def send(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class BrokenSink(RecordingSink):
    def send(self, event: Event) -> None:
        raise EventSinkUnavailable(f"no broker at 127.0.0.1:1 for {event.event_id}; start it and retry")


class BrokenFeatureReader:
    def read(self, user_id: str) -> dict[str, Any]:
        raise FeatureStoreUnavailable(f"online store unreadable for {user_id}; run `perfusion features apply`")


def tiny_generator(text_encoder: TextEncoder) -> PersonalizedGenerator:
    torch.manual_seed(0)
    unet = build_unet(QUICK_CONFIG)
    adaptive = AdaptiveNetwork(unet, AdaptiveConfig(condition_hidden=16, condition_channels=4))
    # Non-zero residual convolutions, so that the user vector changes the images.
    with torch.no_grad():
        for name, parameter in adaptive.named_parameters():
            if any(zero_init in name for zero_init in ZERO_INIT_PARTS):
                parameter.normal_(0.0, 0.05)
    classifier = AttributeClassifier(AttributeClassifierConfig(channels=(8, 16)))
    return PersonalizedGenerator(unet, adaptive, text_encoder, classifier, QUICK_CONFIG, sampler=SamplerConfig(steps=2))


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Feast store (sqlite online) applied in a temp dir, with a cold user and a known user."""
    from perfusion.feature_store import FeaturePusher, apply_feature_repo

    feast_dir = tmp_path_factory.mktemp("feast")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERFUSION_FEAST_DIR", str(feast_dir))
        apply_feature_repo()
        pusher = FeaturePusher.open()
        now = datetime.datetime.now(datetime.UTC)
        pusher.push(
            "user_profile_push", [{"user_id": "cold-user", "age_group": 2, "region": 1, "event_timestamp": now}]
        )
        pusher.push(
            "user_profile_push", [{"user_id": "known-user", "age_group": 0, "region": 3, "event_timestamp": now}]
        )
        preference = [1.0 / DESCRIPTOR_DIM] * DESCRIPTOR_DIM
        preference[0] = 1.0
        row: dict[str, Any] = {name: 3 for name in ("impressions_1h", "impressions_1d", "impressions_total")}
        row.update({f"{kind}_{w}": 1 for kind in ("clicks", "orders", "returns") for w in ("1h", "1d", "total")})
        row.update(images_shown_total=12, images_reviewed_total=0, images_selected_total=0)
        row.update(ctr=0.3, cvr=0.5, preference=preference, last_active_ts=time.time(), user_id="known-user")
        pusher.push("user_preferences_push", [{**row, "event_timestamp": now}])
        yield pusher.store


def build_client(
    tmp_path: Path, generator: PersonalizedGenerator, sink: RecordingSink, reader: Any
) -> tuple[TestClient, DesignRegistry]:
    designs = DesignRegistry(tmp_path / "designs.sqlite")
    app = create_app(
        generator=generator,
        event_sink=sink,
        feature_reader=reader,
        designs=designs,
        images=ImageStore(tmp_path / "images"),
        events_topic=EVENTS_TOPIC,
        production_topic=PRODUCTION_TOPIC,
    )
    return TestClient(app), designs


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def client(tmp_path: Path, text_encoder: TextEncoder, sink: RecordingSink) -> TestClient:
    reader = BrokenFeatureReader()  # tests that need features use the feature_store fixture
    return build_client(tmp_path, tiny_generator(text_encoder), sink, reader)[0]


def create_design(client: TestClient, prompt: str = "a red striped t-shirt", threshold: int = 3) -> str:
    response = client.post("/designs", json={"merchant_id": "m-1", "prompt": prompt, "order_threshold": threshold})
    assert response.status_code == 201, response.text
    return str(response.json()["design_id"])


# ------------------------------------------------------------------------------------------------------ designs


def test_create_design_registers_it_and_produces_design_created(client: TestClient, sink: RecordingSink) -> None:
    design_id = create_design(client, prompt="  a   navy dress ")
    status = client.get(f"/designs/{design_id}").json()
    assert status["prompt"] == "a navy dress"
    assert status["net_orders"] == 0 and status["production_triggered"] is False
    assert PRODUCTION_TOPIC in status["demand_source"]
    (event,) = sink.events
    assert event.kind == "design" and event.design_id == design_id and event.user_id == "m-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"merchant_id": "m", "prompt": "", "order_threshold": 3}, "prompt"),
        ({"merchant_id": "m", "prompt": "   ", "order_threshold": 3}, "prompt"),
        ({"merchant_id": "m", "prompt": "x" * 301, "order_threshold": 3}, "prompt"),
        ({"merchant_id": "m", "prompt": "a dress", "order_threshold": 0}, "order_threshold"),
        ({"merchant_id": "", "prompt": "a dress", "order_threshold": 3}, "merchant_id"),
        ({"merchant_id": "m", "prompt": "a dress", "order_threshold": 3, "colour": "red"}, "colour"),
    ],
)
def test_bad_design_is_422_naming_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/designs", json=body)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"{field}:")


def test_design_is_not_kept_when_kafka_refuses_it(tmp_path: Path, text_encoder: TextEncoder) -> None:
    client, designs = build_client(tmp_path, tiny_generator(text_encoder), BrokenSink(), BrokenFeatureReader())
    response = client.post("/designs", json={"merchant_id": "m", "prompt": "a dress", "order_threshold": 2})
    assert response.status_code == 503
    assert "Kafka unavailable" in response.json()["detail"]
    count = designs._connection.execute("SELECT COUNT(*) FROM designs").fetchone()[0]
    assert count == 0


def test_unknown_design_is_404(client: TestClient) -> None:
    assert client.get("/designs/design-nope").status_code == 404
    response = client.post("/designs/design-nope/candidates", json={"user_id": "u", "k": 2})
    assert response.status_code == 404
    assert "POST /designs" in response.json()["detail"]


# --------------------------------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("k", [0, 17, -1])
def test_k_out_of_range_is_422(client: TestClient, k: int) -> None:
    design_id = create_design(client)
    response = client.post(f"/designs/{design_id}/candidates", json={"user_id": "u", "k": k})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("k:") and f"got {k}" in detail


def test_feast_unavailable_is_503_and_no_impression(client: TestClient, sink: RecordingSink) -> None:
    design_id = create_design(client)
    response = client.post(f"/designs/{design_id}/candidates", json={"user_id": "u", "k": 2})
    assert response.status_code == 503
    assert response.json()["detail"].startswith("Feast unavailable")
    assert [event.kind for event in sink.events] == ["design"]
    assert "perfusion_feast_errors_total 1.0" in client.get("/metrics").text


@pytest.mark.slow
def test_candidates_by_personalization_with_impression(
    tmp_path: Path, text_encoder: TextEncoder, feature_store: Any
) -> None:
    sink = RecordingSink()
    client, _ = build_client(tmp_path, tiny_generator(text_encoder), sink, FeastFeatureReader(feature_store))
    design_id = create_design(client)
    pixels: dict[str, np.ndarray] = {}
    for user_id, expected in (("known-user", "personalized"), ("cold-user", "cold_start"), ("nobody", "base")):
        response = client.post(f"/designs/{design_id}/candidates", json={"user_id": user_id, "k": 3, "seed": 7})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["personalization"] == expected and body["model_version"] == "base"
        assert [c["position"] for c in body["candidates"]] == [0, 1, 2]
        images = []
        for candidate in body["candidates"]:
            assert len(candidate["descriptor"]) == DESCRIPTOR_DIM
            png = client.get(candidate["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            images.append(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")))
        pixels[user_id] = np.stack(images)
        impression = sink.events[-1]
        assert isinstance(impression, Impression)
        assert impression.event_id == body["impression_id"] and impression.user_id == user_id
        assert [c.image_id for c in impression.candidates] == [c["image_id"] for c in body["candidates"]]
    # Different users, same seed: the user vector changes the pixels; the unknown user gets the base model.
    assert not np.array_equal(pixels["known-user"], pixels["cold-user"])
    assert not np.array_equal(pixels["cold-user"], pixels["nobody"])


# ------------------------------------------------------------------------------------------------------- events


def make_click(design_id: str, **changes: Any) -> dict[str, Any]:
    event = {
        "kind": "click",
        "event_id": f"evt-{uuid.uuid4().hex}",
        "ts": time.time(),
        "user_id": "shopper-1",
        "impression_id": "imp-1",
        "design_id": design_id,
        "image_id": "gen-0123456789abcdef",
    }
    event.update(changes)
    return event


def test_valid_event_is_produced(client: TestClient, sink: RecordingSink) -> None:
    design_id = create_design(client)
    click = make_click(design_id)
    response = client.post("/events", content=json.dumps(click))
    assert response.status_code == 202, response.text
    assert response.json() == {"event_id": click["event_id"], "kind": "click", "topic": EVENTS_TOPIC}
    assert sink.events[-1].event_id == click["event_id"]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"image_id": ""}, "image_id"),
        ({"ts": -5.0}, "ts"),
        ({"kind": "like"}, "kind"),
        ({"kind": "design", "prompt": "a dress", "order_threshold": 2}, "produced by the service"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_malformed_event_is_422_with_the_reason(
    client: TestClient, sink: RecordingSink, changes: dict[str, Any], fragment: str
) -> None:
    design_id = create_design(client)
    event = make_click(design_id, **changes)
    if changes.get("kind") == "design":
        del event["impression_id"], event["image_id"]
    response = client.post("/events", content=json.dumps(event))
    assert response.status_code == 422
    assert fragment in response.json()["detail"]
    assert [e.kind for e in sink.events] == ["design"]


def test_not_json_and_unknown_design_events(client: TestClient) -> None:
    assert client.post("/events", content=b"{not json").status_code == 422
    response = client.post("/events", content=json.dumps(make_click("design-missing")))
    assert response.status_code == 404 and "design_id" in response.json()["detail"]


def test_event_is_503_when_kafka_is_down(tmp_path: Path, text_encoder: TextEncoder) -> None:
    client, designs = build_client(tmp_path, tiny_generator(text_encoder), BrokenSink(), BrokenFeatureReader())
    design = designs.create("m", "a dress", 2)
    response = client.post("/events", content=json.dumps(make_click(design.design_id)))
    assert response.status_code == 503
    assert 'perfusion_kafka_errors_total{operation="produce"} 1.0' in client.get("/metrics").text


# ------------------------------------------------------------------------------------------ health and metrics


def test_healthz_and_metrics(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"] == "base"
    client.get("/designs/design-nope")
    text = client.get("/metrics").text
    assert 'perfusion_model_version_info{version="base"} 1.0' in text
    assert 'perfusion_http_requests_total{method="GET",route="/designs/{design_id}",status="404"} 1.0' in text


def test_missing_image_is_404(client: TestClient) -> None:
    assert client.get("/images/gen-0000000000000000").status_code == 404
    assert client.get("/images/..%2Fetc").status_code == 404
