"""The generator service's HTTP API on tiny seeded models: validation, cold start, 404/503 paths, metrics.

The event sink here records what the app hands it (the app takes any EventSink); the Kafka path itself is tested
against the real broker in test_service_integration.py. User features come from a real Feast store in a temp dir.
Every request carries the API key of a principal allowed to make it; who may do what is tested in test_auth.py.
"""

from __future__ import annotations

import datetime
import io
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from perfusion.attributes import DESCRIPTOR_DIM
from perfusion.contracts.records import Candidate, Event, Impression
from perfusion.image_store import ImageStore
from perfusion.models.adaptive import AdaptiveConfig, AdaptiveNetwork
from perfusion.models.attribute_classifier import AttributeClassifier, AttributeClassifierConfig
from perfusion.models.base import QUICK_CONFIG, build_unet
from perfusion.sampler_config import SamplerConfig
from perfusion.text_encoder import TextEncoder
from service.app import create_app
from service.auth import AuthSettings, IssuedKey, KeyStore
from service.designs import DesignRegistry
from service.events import EventSinkUnavailable
from service.features import FeastFeatureReader, FeatureStoreUnavailable
from service.generator import PersonalizedGenerator
from service.ledger import EventLedger

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

    def check_reachable(self, timeout_s: float) -> str:
        return "recording in memory"

    def close(self) -> None:
        pass


class BrokenSink(RecordingSink):
    def send(self, event: Event) -> None:
        raise EventSinkUnavailable(f"no broker at 127.0.0.1:1 for {event.event_id}; start it and retry")

    def check_reachable(self, timeout_s: float) -> str:
        raise EventSinkUnavailable("no broker at 127.0.0.1:1; start it with `perfusion broker up`")


class BrokenFeatureReader:
    def read(self, user_id: str) -> dict[str, Any]:
        raise FeatureStoreUnavailable(f"online store unreadable for {user_id}; run `perfusion features apply`")

    def check_reachable(self, timeout_s: float) -> str:
        return str(self.read("~readiness-check"))


class NoFeatures:
    """A store that knows nobody: every viewer is served the base model."""

    def read(self, user_id: str) -> dict[str, Any]:
        return {}

    def check_reachable(self, timeout_s: float) -> str:
        return "knows nobody"


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


@dataclass
class ServiceUnderTest:
    """The app from the real factory, its stores, and clients that send the keys of principals (created on use)."""

    app: FastAPI
    designs: DesignRegistry
    ledger: EventLedger
    keys: KeyStore
    issued: dict[tuple[str, str], IssuedKey] = field(default_factory=dict)

    def key(self, role: str, principal: str) -> IssuedKey:
        if (role, principal) not in self.issued:
            self.issued[(role, principal)] = self.keys.create(role, principal)
        return self.issued[(role, principal)]

    def client(self, role: str | None = None, principal: str | None = None) -> TestClient:
        """A client sending the key of ``principal`` in ``role``; without credentials when ``role`` is None."""
        if role is None:
            return TestClient(self.app)
        return TestClient(self.app, headers=self.key(role, principal or role).authorization)

    def merchant(self, merchant_id: str = "m-1") -> TestClient:
        return self.client("merchant", merchant_id)

    def shopper(self, user_id: str = "shopper-1") -> TestClient:
        return self.client("shopper", user_id)

    def order_system(self) -> TestClient:
        return self.client("order_system", "shop-orders")

    def operator(self) -> TestClient:
        return self.client("operator", "ops-1")


def build_service(tmp_path: Path, generator: Any, sink: RecordingSink, reader: Any, **options: Any) -> ServiceUnderTest:
    designs = DesignRegistry(tmp_path / "designs.sqlite")
    ledger = EventLedger(tmp_path / "ledger.sqlite")
    keys = KeyStore(tmp_path / "keys.json")
    app = create_app(
        generator=generator,
        event_sink=sink,
        feature_reader=reader,
        designs=designs,
        images=ImageStore(tmp_path / "images"),
        events_topic=EVENTS_TOPIC,
        production_topic=PRODUCTION_TOPIC,
        keys=keys,
        ledger=ledger,
        auth=options.pop("auth", AuthSettings()),
        **options,
    )
    return ServiceUnderTest(app, designs, ledger, keys)


def served_impression(
    service: ServiceUnderTest,
    design_id: str,
    user_id: str = "shopper-1",
    impression_id: str | None = None,
    image_ids: Sequence[str] = ("gen-0123456789abcdef", "gen-fedcba9876543210"),
) -> Impression:
    """An impression kept in the service's ledger as ``POST /designs/{id}/candidates`` keeps the ones it serves, for
    tests of events that need no generated pixels."""
    impression = Impression(
        event_id=impression_id or f"imp-{uuid.uuid4().hex}",
        ts=time.time(),
        user_id=user_id,
        design_id=design_id,
        prompt="a red striped t-shirt",
        model_version="base",
        candidates=[
            Candidate(image_id=image_id, position=position, descriptor=[0.0] * DESCRIPTOR_DIM)
            for position, image_id in enumerate(image_ids)
        ],
    )
    service.ledger.record_impression(impression)
    return impression


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def service(tmp_path: Path, text_encoder: TextEncoder, sink: RecordingSink) -> ServiceUnderTest:
    reader = BrokenFeatureReader()  # tests that need features use the feature_store fixture
    return build_service(tmp_path, tiny_generator(text_encoder), sink, reader)


@pytest.fixture
def client(service: ServiceUnderTest) -> TestClient:
    """Merchant m-1's client."""
    return service.merchant()


def create_design(
    client: TestClient, prompt: str = "a red striped t-shirt", threshold: int = 3, merchant_id: str | None = None
) -> str:
    """A design of the merchant whose client this is (an operator's client names ``merchant_id``)."""
    body: dict[str, Any] = {"prompt": prompt, "order_threshold": threshold}
    if merchant_id is not None:
        body["merchant_id"] = merchant_id
    response = client.post("/designs", json=body)
    assert response.status_code == 201, response.text
    design_id = str(response.json()["design_id"])
    assert response.headers["location"].endswith(f"/designs/{design_id}")  # where its status is read
    return design_id


# ------------------------------------------------------------------------------------------------------ designs


def test_create_design_registers_it_and_produces_design_created(client: TestClient, sink: RecordingSink) -> None:
    design_id = create_design(client, prompt="  a   navy dress ")
    status = client.get(f"/designs/{design_id}").json()
    assert status["prompt"] == "a navy dress" and status["merchant_id"] == "m-1"
    assert status["net_orders"] == 0 and status["production_triggered"] is False
    assert PRODUCTION_TOPIC in status["demand_source"]
    (event,) = sink.events
    assert event.kind == "design" and event.design_id == design_id and event.user_id == "m-1"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"merchant_id": "m-1", "prompt": "", "order_threshold": 3}, "prompt"),
        ({"prompt": "   ", "order_threshold": 3}, "prompt"),
        ({"prompt": "x" * 301, "order_threshold": 3}, "prompt"),
        ({"prompt": "a dress", "order_threshold": 0}, "order_threshold"),
        ({"merchant_id": "", "prompt": "a dress", "order_threshold": 3}, "merchant_id"),
        ({"prompt": "a dress", "order_threshold": 3, "colour": "red"}, "colour"),
    ],
)
def test_bad_design_is_422_naming_the_field(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/designs", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["detail"].startswith(f"{field}:")
    assert problem["type"] == "/problems/invalid-request" and problem["status"] == 422 and problem["field"] == field


def test_design_is_not_kept_when_kafka_refuses_it(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build_service(tmp_path, tiny_generator(text_encoder), BrokenSink(), BrokenFeatureReader())
    response = service.merchant().post("/designs", json={"prompt": "a dress", "order_threshold": 2})
    assert response.status_code == 503
    assert "Kafka unavailable" in response.json()["detail"]
    count = service.designs._connection.execute("SELECT COUNT(*) FROM designs").fetchone()[0]
    assert count == 0


def test_unknown_design_is_404(client: TestClient) -> None:
    assert client.get("/designs/design-nope").status_code == 404
    response = client.post("/designs/design-nope/candidates", json={"k": 2})
    assert response.status_code == 404
    assert "POST /designs" in response.json()["detail"]
    assert response.json()["type"] == "/problems/not-found"


def test_a_merchant_lists_their_own_designs(service: ServiceUnderTest) -> None:
    mine = [create_design(service.merchant("m-1"), prompt=prompt) for prompt in ("a dress", "a red skirt")]
    create_design(service.merchant("m-2"))
    listed = service.merchant("m-1").get("/designs").json()["designs"]
    assert [design["design_id"] for design in listed] == mine
    assert {design["merchant_id"] for design in listed} == {"m-1"}
    assert len(service.operator().get("/designs").json()["designs"]) == 3


def test_designs_are_listed_in_pages_with_a_cursor(service: ServiceUnderTest) -> None:
    prompts = ("a dress", "a red skirt", "a navy jacket", "a black t-shirt", "a green hoodie")
    created = [create_design(service.merchant("m-1"), prompt=prompt) for prompt in prompts]
    client, seen, cursor, pages = service.merchant("m-1"), [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/designs", params=params).json()
        seen += [design["design_id"] for design in page["designs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created and pages == 3
    refused = client.get("/designs", params={"cursor": "not-a-cursor"})
    assert refused.status_code == 422 and refused.json()["field"] == "cursor"


# --------------------------------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("k", [0, 17, -1])
def test_k_out_of_range_is_422(client: TestClient, k: int) -> None:
    design_id = create_design(client)
    response = client.post(f"/designs/{design_id}/candidates", json={"k": k})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("k:") and f"got {k}" in detail


def test_feast_unavailable_is_503_and_no_impression(service: ServiceUnderTest, sink: RecordingSink) -> None:
    design_id = create_design(service.merchant())
    response = service.shopper().post(f"/designs/{design_id}/candidates", json={"k": 2})
    assert response.status_code == 503
    assert response.json()["detail"].startswith("Feast unavailable")
    assert [event.kind for event in sink.events] == ["design"]
    assert "perfusion_feast_errors_total 1.0" in service.client().get("/metrics").text


def test_an_impression_kafka_refused_is_not_kept(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build_service(tmp_path, tiny_generator(text_encoder), BrokenSink(), NoFeatures())
    design = service.designs.create("m-1", "a dress", 2)
    response = service.shopper().post(f"/designs/{design.design_id}/candidates", json={"k": 1, "seed": 1})
    assert response.status_code == 503
    assert service.ledger._connection.execute("SELECT COUNT(*) FROM impressions").fetchone()[0] == 0


@pytest.mark.slow
def test_candidates_by_personalization_with_impression(
    tmp_path: Path, text_encoder: TextEncoder, feature_store: Any
) -> None:
    sink = RecordingSink()
    service = build_service(tmp_path, tiny_generator(text_encoder), sink, FeastFeatureReader(feature_store))
    design_id = create_design(service.merchant())
    pixels: dict[str, np.ndarray] = {}
    for user_id, expected in (("known-user", "personalized"), ("cold-user", "cold_start"), ("nobody", "base")):
        viewer = service.shopper(user_id)
        response = viewer.post(f"/designs/{design_id}/candidates", json={"k": 3, "seed": 7})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["personalization"] == expected and body["model_version"] == "base"
        assert body["user_id"] == user_id
        assert body["drawn"] == 3 and body["ranked_by"] is None  # best-of-N is off: the K drawn are shown
        assert [c["position"] for c in body["candidates"]] == [0, 1, 2]
        images = []
        for candidate in body["candidates"]:
            assert len(candidate["descriptor"]) == DESCRIPTOR_DIM
            png = viewer.get(candidate["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.headers["cache-control"] == "private, max-age=31536000, immutable"
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
    """A click of shopper-1 on the first candidate of impression imp-1 (see :func:`served_impression`)."""
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


@pytest.fixture
def design_id(service: ServiceUnderTest) -> str:
    """A design of m-1 with impression imp-1 served to shopper-1."""
    design = create_design(service.merchant())
    served_impression(service, design, impression_id="imp-1")
    return design


def test_valid_event_is_produced(service: ServiceUnderTest, sink: RecordingSink, design_id: str) -> None:
    click = make_click(design_id)
    response = service.shopper().post("/events", content=json.dumps(click))
    assert response.status_code == 202, response.text
    assert response.json() == {"event_id": click["event_id"], "kind": "click", "ts": click["ts"], "topic": EVENTS_TOPIC}
    assert sink.events[-1].event_id == click["event_id"]


def test_the_service_assigns_the_id_time_and_user_left_out(
    service: ServiceUnderTest, sink: RecordingSink, design_id: str
) -> None:
    click = make_click(design_id)
    for name in ("event_id", "ts", "user_id"):
        del click[name]
    before = time.time()
    response = service.shopper().post("/events", content=json.dumps(click))
    assert response.status_code == 202, response.text
    accepted = response.json()
    produced = sink.events[-1]
    assert produced.event_id == accepted["event_id"] and produced.event_id.startswith("evt-")
    assert produced.user_id == "shopper-1" and before <= produced.ts == accepted["ts"] <= time.time()


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
    service: ServiceUnderTest, sink: RecordingSink, design_id: str, changes: dict[str, Any], fragment: str
) -> None:
    event = make_click(design_id, **changes)
    if changes.get("kind") == "design":
        del event["impression_id"], event["image_id"]
    response = service.shopper().post("/events", content=json.dumps(event))
    assert response.status_code == 422
    assert fragment in response.json()["detail"]
    assert response.json()["type"] == "/problems/invalid-event"
    assert [e.kind for e in sink.events] == ["design"]


def test_not_json_and_unknown_design_events(service: ServiceUnderTest) -> None:
    shopper = service.shopper()
    assert shopper.post("/events", content=b"{not json").status_code == 422
    response = shopper.post("/events", content=json.dumps(make_click("design-missing")))
    assert response.status_code == 404 and "design_id" in response.json()["detail"]


def test_event_is_503_when_kafka_is_down_and_not_kept(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build_service(tmp_path, tiny_generator(text_encoder), BrokenSink(), BrokenFeatureReader())
    design = service.designs.create("m", "a dress", 2)
    served_impression(service, design.design_id, impression_id="imp-1")
    click = json.dumps(make_click(design.design_id))
    response = service.shopper().post("/events", content=click)
    assert response.status_code == 503
    assert 'perfusion_kafka_errors_total{operation="produce"} 1.0' in service.client().get("/metrics").text
    # Nothing of it was kept: the same event, id and all, may be sent again once Kafka is back.
    assert service.ledger._connection.execute("SELECT COUNT(*) FROM event_ids WHERE kind = 'click'").fetchone() == (0,)


# ------------------------------------------------------------------------------------------ health and metrics


def test_healthz_and_metrics(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"] == "base"
    client.get("/designs/design-nope")
    text = client.get("/metrics").text
    assert 'perfusion_model_version_info{version="base"} 1.0' in text
    assert 'perfusion_http_requests_total{method="GET",route="/designs/{design_id}",status="404"} 1.0' in text


def test_missing_image_is_404(service: ServiceUnderTest) -> None:
    for client in (service.shopper(), service.operator()):
        assert client.get("/images/gen-0000000000000000").status_code == 404
        assert client.get("/images/..%2Fetc").status_code == 404


def test_every_problem_type_is_described_at_its_uri(client: TestClient) -> None:
    from service.problems import PROBLEM_TYPES

    for slug, problem in PROBLEM_TYPES.items():
        described = client.get(problem.uri)
        assert described.status_code == 200, slug
        assert described.json()["status"] == problem.status and described.json()["how_to_comply"]
    missing = client.get("/problems/no-such-rule")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


def test_unrouted_requests_are_problem_details_too(client: TestClient) -> None:
    unknown = client.get("/no-such-path")
    assert unknown.status_code == 404 and unknown.json()["type"] == "/problems/not-found"
    wrong_method = client.delete("/designs")
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "/problems/method-not-allowed"
    assert wrong_method.headers["allow"]  # the methods of the first route of that path (Starlette)
    assert wrong_method.headers["content-type"] == "application/problem+json"
