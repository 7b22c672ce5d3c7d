"""Rate limits per principal: a token bucket for each caller and endpoint class, 429 problem details with
Retry-After naming the limit and its setting, and nothing of a refused request reaching the event sink.

The buckets' arithmetic is tested on a clock the test moves; the app's limits are set so low (a token a hundred
minutes) that no bucket refills while a test runs.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from perfusion.errors import ConfigError
from perfusion.text_encoder import TextEncoder
from service.auth import Principal
from service.limits import RateLimiter, RateLimitSettings
from service.problems import Refusal
from service.settings import ServiceSettings
from tests.service.test_service_api import (
    NoFeatures,
    RecordingSink,
    ServiceUnderTest,
    build_service,
    create_design,
    served_impression,
    tiny_generator,
)

BURST = 2
# One token every hundred minutes: no bucket refills during a test.
SLOW = RateLimitSettings(generation_per_minute=0.01, generation_burst=BURST, events_per_minute=0.01, events_burst=BURST)
SHOPPER = Principal(role="shopper", id="shopper-1", key_id="k1")


class ManualClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------- the buckets


def test_a_bucket_gives_its_burst_then_waits_for_the_rate() -> None:
    clock = ManualClock()
    limiter = RateLimiter(RateLimitSettings(generation_per_minute=6.0, generation_burst=3), clock=clock)
    assert [limiter.seconds_until_allowed(SHOPPER, "generation") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.seconds_until_allowed(SHOPPER, "generation") == pytest.approx(10.0)  # 6 a minute: one per 10 s
    clock.now += 4.0
    assert limiter.seconds_until_allowed(SHOPPER, "generation") == pytest.approx(6.0)  # a refused request takes none
    clock.now += 6.0
    assert limiter.seconds_until_allowed(SHOPPER, "generation") == 0.0
    clock.now += 3600.0  # a long pause refills to the burst, no further
    assert [limiter.seconds_until_allowed(SHOPPER, "generation") for _ in range(4)][-1] > 0.0


def test_each_principal_and_endpoint_class_has_its_own_bucket() -> None:
    limiter = RateLimiter(SLOW, clock=ManualClock())
    for _ in range(BURST):
        limiter.admit(SHOPPER, "generation")
    with pytest.raises(Refusal):
        limiter.admit(SHOPPER, "generation")
    limiter.admit(SHOPPER, "events")
    limiter.admit(Principal(role="shopper", id="shopper-2", key_id="k2"), "generation")
    # One principal's keys share one budget.
    with pytest.raises(Refusal):
        limiter.admit(Principal(role="shopper", id="shopper-1", key_id="another-key"), "generation")


def test_the_refusal_names_the_limit_its_setting_and_when_to_retry() -> None:
    limiter = RateLimiter(RateLimitSettings(events_per_minute=30.0, events_burst=1), clock=ManualClock())
    limiter.admit(SHOPPER, "events")
    with pytest.raises(Refusal) as refused:
        limiter.admit(SHOPPER, "events")
    assert refused.value.status == 429 and refused.value.field == "Authorization"
    assert refused.value.headers == {"Retry-After": "2"}  # 30 a minute: the next token in 2 s
    detail = refused.value.detail
    assert detail.startswith("Authorization: shopper 'shopper-1' is over the events limit of 30 requests per minute")
    assert "PERFUSION_SERVE_LIMITS__EVENTS_PER_MINUTE" in detail and "retry in 2 s" in detail


def test_trusted_roles_are_limited_only_when_configured() -> None:
    for role in ("order_system", "operator"):
        principal = Principal(role=role, id="trusted", key_id="k")
        free = RateLimiter(SLOW, clock=ManualClock())
        assert all(free.seconds_until_allowed(principal, "events") == 0.0 for _ in range(10 * BURST))
        limited = RateLimiter(SLOW.with_overrides(include_trusted_roles=True), clock=ManualClock())
        assert [limited.seconds_until_allowed(principal, "events") > 0.0 for _ in range(BURST + 1)][-1]


def test_the_limits_are_service_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFUSION_SERVE_LIMITS__GENERATION_PER_MINUTE", "12")
    monkeypatch.setenv("PERFUSION_SERVE_LIMITS__EVENTS_BURST", "7")
    limits = ServiceSettings.from_env().limits
    assert (limits.generation_per_minute, limits.events_burst) == (12.0, 7)
    assert limits.generation_burst == RateLimitSettings().generation_burst
    with pytest.raises(ConfigError, match="generation_burst must be between 1 and 10000, got 0"):
        ServiceSettings.from_env(limits={"generation_burst": 0})
    description = RateLimitSettings.model_fields["generation_per_minute"].description
    assert description is not None and "per minute" in description


# ------------------------------------------------------------------------------------------------------ the app


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def limited(tmp_path: Path, text_encoder: TextEncoder, sink: RecordingSink) -> ServiceUnderTest:
    return build_service(tmp_path, tiny_generator(text_encoder), sink, NoFeatures(), limits=SLOW)


def rate_limited(response: httpx.Response, endpoint_class: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    problem: dict[str, Any] = response.json()
    assert problem["type"] == "/problems/rate-limited" and problem["status"] == 429
    assert problem["field"] == "Authorization" and problem["detail"].startswith("Authorization: ")
    assert f"PERFUSION_SERVE_LIMITS__{endpoint_class.upper()}_PER_MINUTE" in problem["detail"]
    assert f"retry in {retry_after} s" in problem["detail"]
    return problem


def test_generation_over_the_limit_is_429_and_generates_nothing(limited: ServiceUnderTest, sink: RecordingSink) -> None:
    design = create_design(limited.merchant())
    shopper = limited.shopper("shopper-1")
    for seed in range(BURST):
        response = shopper.post(f"/designs/{design}/candidates", json={"k": 1, "seed": seed})
        assert response.status_code == 200, response.text
    sent = len(sink.events)
    rate_limited(shopper.post(f"/designs/{design}/candidates", json={"k": 1, "seed": 9}), "generation")
    assert len(sink.events) == sent  # no impression
    # Another principal, and an operator (trusted), are still served.
    assert limited.shopper("shopper-2").post(f"/designs/{design}/candidates", json={"k": 1}).status_code == 200
    for _ in range(BURST + 1):
        operator = limited.operator().post(f"/designs/{design}/candidates", json={"k": 1, "user_id": "u-9"})
        assert operator.status_code == 200, operator.text
    metrics = limited.client().get("/metrics").text
    assert 'perfusion_rate_limited_total{endpoint_class="generation"} 1.0' in metrics


def click(impression_id: str, design: str, image_id: str) -> str:
    fields = {"kind": "click", "impression_id": impression_id, "design_id": design, "image_id": image_id}
    return json.dumps({"event_id": f"evt-{uuid.uuid4().hex}", "ts": time.time(), **fields})


def test_events_over_the_limit_are_429_and_reach_no_topic(limited: ServiceUnderTest, sink: RecordingSink) -> None:
    design = create_design(limited.merchant())
    impression = served_impression(limited, design, user_id="shopper-1")
    image_id = impression.candidates[0].image_id
    shopper = limited.shopper("shopper-1")
    for _ in range(BURST):
        assert shopper.post("/events", content=click(impression.event_id, design, image_id)).status_code == 202
    sent = len(sink.events)
    rate_limited(shopper.post("/events", content=click(impression.event_id, design, image_id)), "events")
    assert len(sink.events) == sent
    # The order system reports every shopper's orders: trusted, not limited.
    for _ in range(BURST + 1):
        body = json.loads(click(impression.event_id, design, image_id))
        body.update(kind="order", user_id="shopper-1", quantity=1)
        assert limited.order_system().post("/events", json=body).status_code == 202


def test_a_checkout_counts_against_the_shoppers_events_limit(limited: ServiceUnderTest, sink: RecordingSink) -> None:
    design = create_design(limited.merchant())
    impression = served_impression(limited, design, user_id="shopper-3")
    body = {"impression_id": impression.event_id, "design_id": design, "image_id": impression.candidates[0].image_id}
    shopper = limited.shopper("shopper-3")
    assert shopper.post("/events", content=click(impression.event_id, design, body["image_id"])).status_code == 202
    assert shopper.post("/shop/checkout", json=body).status_code == 202
    sent = len(sink.events)
    rate_limited(shopper.post("/shop/checkout", json=body), "events")
    assert len(sink.events) == sent


def test_a_request_without_a_key_is_401_not_429(limited: ServiceUnderTest) -> None:
    design = create_design(limited.merchant())
    anonymous = limited.client()
    for _ in range(BURST + 1):
        assert anonymous.post(f"/designs/{design}/candidates", json={"k": 1}).status_code == 401
