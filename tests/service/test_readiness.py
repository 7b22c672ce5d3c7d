"""``/readyz``: 200 only when Kafka answers, the Feast store reads and a model is loaded; otherwise 503 problem
details naming each failed check and its fix. ``/healthz`` stays liveness only and answers either way."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from perfusion.text_encoder import TextEncoder
from service.events import KafkaEventSink
from service.readiness import ReadinessSettings
from tests.service.test_service_api import (
    EVENTS_TOPIC,
    BrokenFeatureReader,
    BrokenSink,
    NoFeatures,
    RecordingSink,
    ServiceUnderTest,
    build_service,
    tiny_generator,
)

# Only a bound on how long a hung check is waited for, so that the test does not hang with it.
SHORT_WAIT = ReadinessSettings(timeout_s=0.2)


def build(tmp_path: Path, text_encoder: TextEncoder, sink: Any, reader: Any, **options: Any) -> ServiceUnderTest:
    return build_service(tmp_path, tiny_generator(text_encoder), sink, reader, **options)


def not_ready(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == "/problems/not-ready" and problem["status"] == 503
    assert {check["name"] for check in problem["checks"]} == {"kafka", "feast", "model"}
    return problem


def failed_checks(problem: dict[str, Any]) -> set[str]:
    return {check["name"] for check in problem["checks"] if not check["ok"]}


def test_ready_when_kafka_feast_and_the_model_answer(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build(tmp_path, text_encoder, RecordingSink(), NoFeatures())
    response = service.client().get("/readyz")  # public, as /healthz is
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and all(check["ok"] for check in body["checks"])
    model = next(check for check in body["checks"] if check["name"] == "model")
    assert model["detail"] == "serving model version base"


def test_kafka_down_is_503_naming_the_check_and_the_fix(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build(tmp_path, text_encoder, BrokenSink(), NoFeatures())
    problem = not_ready(service.client().get("/readyz"))
    assert failed_checks(problem) == {"kafka"}
    assert problem["detail"].startswith("kafka: ") and "perfusion broker up" in problem["detail"]
    assert service.client().get("/healthz").status_code == 200  # liveness only


def test_feast_unreadable_is_503_naming_the_check(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build(tmp_path, text_encoder, RecordingSink(), BrokenFeatureReader())
    problem = not_ready(service.client().get("/readyz"))
    assert failed_checks(problem) == {"feast"}
    assert problem["detail"].startswith("feast: ") and "perfusion features apply" in problem["detail"]


def test_every_failed_check_is_named(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build(tmp_path, text_encoder, BrokenSink(), BrokenFeatureReader())
    problem = not_ready(service.client().get("/readyz"))
    assert failed_checks(problem) == {"kafka", "feast"}
    assert "kafka: " in problem["detail"] and "; feast: " in problem["detail"]


def test_a_real_kafka_sink_with_no_broker_is_not_ready(tmp_path: Path, text_encoder: TextEncoder) -> None:
    sink = KafkaEventSink("127.0.0.1:1", EVENTS_TOPIC, timeout_s=0.5)  # nothing listens on port 1
    try:
        service = build(tmp_path, text_encoder, sink, NoFeatures(), readiness=ReadinessSettings(timeout_s=1.0))
        problem = not_ready(service.client().get("/readyz"))
    finally:
        sink.close()
    assert failed_checks(problem) == {"kafka"}
    assert problem["detail"].startswith("kafka: ")
    assert "perfusion broker" in problem["detail"] and "KAFKA_BOOTSTRAP_SERVERS" in problem["detail"]


class SilentSink(RecordingSink):
    """A sink whose broker never answers a metadata request until the test lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.checks = 0

    def check_reachable(self, timeout_s: float) -> str:
        self.checks += 1
        self.answer.wait(60.0)
        return "answered at last"


def test_a_check_that_does_not_answer_fails_and_is_not_started_twice(tmp_path: Path, text_encoder: TextEncoder) -> None:
    sink = SilentSink()
    service = build(tmp_path, text_encoder, sink, NoFeatures(), readiness=SHORT_WAIT)
    try:
        for _ in range(3):
            problem = not_ready(service.client().get("/readyz"))
            assert failed_checks(problem) == {"kafka"} and "no answer within 0.2 s" in problem["detail"]
        assert sink.checks == 1  # the hung check is waited for again, not piled up
    finally:
        sink.answer.set()


class SinkWithoutACheck:
    def send(self, event: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_sink_that_cannot_be_checked_is_not_ready(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build(tmp_path, text_encoder, SinkWithoutACheck(), NoFeatures())
    problem = not_ready(service.client().get("/readyz"))
    assert failed_checks(problem) == {"kafka"} and "cannot be checked" in problem["detail"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_liveness_and_readiness_are_in_the_schema(tmp_path: Path, text_encoder: TextEncoder, path: str) -> None:
    service = build(tmp_path, text_encoder, RecordingSink(), NoFeatures())
    assert path in service.app.openapi()["paths"]
