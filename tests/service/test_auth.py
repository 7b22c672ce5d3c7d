"""Who is calling and what each may do: every row of the README's table, allowed and refused, on the real app.

The app comes from the real factory (``service.app.create_app``) with a tiny seeded generator, a feature store that
knows nobody, a real key store and ledger in a temp dir, and a sink that records what would go to Kafka; every
refusal is checked to be problem+json naming its rule and field, and to have sent nothing to the sink. That nothing
refused reaches the real topic is tested against the broker in test_service_integration.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from ops.commands.keys import ROLE_CHOICES
from perfusion.text_encoder import TextEncoder
from service.access import ALLOWED_ROLES, Action
from service.auth import ROLES, AuthSettings, KeyStore
from tests.service.test_service_api import (
    NoFeatures,
    RecordingSink,
    ServiceUnderTest,
    build_service,
    create_design,
    tiny_generator,
)

PRINCIPALS = {"merchant": "m-1", "shopper": "shopper-1", "order_system": "shop-orders", "operator": "ops-1"}
MAX_QUANTITY = 100
SKEW_S = 300.0


@dataclass
class Shop:
    """One service for the module, with two merchants' designs and impressions served by the real endpoint."""

    service: ServiceUnderTest
    sink: RecordingSink
    design_a: str  # m-1's
    design_b: str  # m-2's
    shown: dict[str, dict[str, Any]]  # "shopper-1/a" -> the candidates response

    def client(self, role: str, principal: str | None = None) -> TestClient:
        return self.service.client(role, principal or PRINCIPALS[role])

    def impression(self, key: str) -> tuple[str, list[str]]:
        body = self.shown[key]
        return body["impression_id"], [candidate["image_id"] for candidate in body["candidates"]]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, text_encoder: TextEncoder) -> Iterator[Shop]:
    sink = RecordingSink()
    service = build_service(
        tmp_path_factory.mktemp("auth"),
        tiny_generator(text_encoder),
        sink,
        NoFeatures(),
        auth=AuthSettings(max_clock_skew_s=SKEW_S, max_quantity=MAX_QUANTITY),
    )
    design_a = create_design(service.merchant("m-1"), prompt="a red dress")
    design_b = create_design(service.merchant("m-2"), prompt="a navy jacket")
    shown: dict[str, dict[str, Any]] = {}
    for seed, (key, role, viewer, design) in enumerate(
        (
            ("shopper-1/a", "shopper", "shopper-1", design_a),
            ("shopper-2/a", "shopper", "shopper-2", design_a),
            ("m-1/a", "merchant", "m-1", design_a),
            ("m-2/b", "merchant", "m-2", design_b),
        )
    ):
        # A seed each: images are addressed by content, so one seed would serve everyone the same images.
        response = service.client(role, viewer).post(f"/designs/{design}/candidates", json={"k": 2, "seed": seed})
        assert response.status_code == 200, response.text
        shown[key] = response.json()
    yield Shop(service, sink, design_a, design_b, shown)


def refused(shop: Shop, response: httpx.Response, status: int, slug: str, field: str | None = None) -> str:
    """Assert a refusal: its status, problem+json of the rule, the field named first in the detail, nothing sent."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"/problems/{slug}" and problem["status"] == status and problem["title"]
    if field is not None:
        assert problem["field"] == field and problem["detail"].startswith(f"{field}:"), problem
    return str(problem["detail"])


@pytest.fixture
def nothing_sent(shop: Shop) -> Iterator[None]:
    """The test's requests (all refused) hand nothing to the event sink."""
    before = len(shop.sink.events)
    yield
    assert shop.sink.events[before:] == []


def event(fields: dict[str, Any]) -> str:
    """``fields`` as a posted event, with a new event id and the current time unless they name their own."""
    return json.dumps({"event_id": f"evt-{uuid.uuid4().hex}", "ts": time.time(), **fields})


def click(shop: Shop, key: str = "shopper-1/a", **changes: Any) -> str:
    impression_id, image_ids = shop.impression(key)
    user_id, design = key.split("/")
    fields = {
        "kind": "click",
        "user_id": user_id,
        "impression_id": impression_id,
        "design_id": shop.design_a if design == "a" else shop.design_b,
        "image_id": image_ids[0],
    }
    return event({**fields, **changes})


def order(shop: Shop, key: str = "shopper-1/a", quantity: int = 1, **changes: Any) -> str:
    payload = json.loads(click(shop, key))
    payload.update(kind="order", quantity=quantity, event_id=f"order-{uuid.uuid4().hex}", **changes)
    return json.dumps(payload)


def placed_order(shop: Shop, key: str = "shopper-1/a", quantity: int = 2) -> dict[str, Any]:
    body = order(shop, key, quantity)
    response = shop.client("order_system").post("/events", content=body)
    assert response.status_code == 202, response.text
    return dict(json.loads(body))


def return_of(placed: dict[str, Any], quantity: int | None = None, **changes: Any) -> str:
    fields = {name: placed[name] for name in ("user_id", "impression_id", "design_id", "image_id")}
    quantity = placed["quantity"] if quantity is None else quantity
    return event({"kind": "return", "order_id": placed["event_id"], "quantity": quantity, **fields, **changes})


def select(shop: Shop, key: str = "m-1/a", **changes: Any) -> str:
    impression_id, image_ids = shop.impression(key)
    user_id, design = key.split("/")
    fields = {
        "kind": "select",
        "user_id": user_id,
        "impression_id": impression_id,
        "design_id": shop.design_a if design == "a" else shop.design_b,
        "image_ids": image_ids[:1],
    }
    return event({**fields, **changes})


def test_the_cli_offers_exactly_the_roles_of_the_service() -> None:
    assert ROLE_CHOICES == ROLES


# ------------------------------------------------------------------------------------------------ who is calling

PROTECTED = [
    ("POST", "/designs", {"json": {"prompt": "a dress", "order_threshold": 2}}),
    ("GET", "/designs", {}),
    ("GET", "/designs/{a}", {}),
    ("POST", "/designs/{a}/candidates", {"json": {"k": 1}}),
    ("GET", "/images/{image}", {}),
    ("POST", "/events", {"content": b"{}"}),
]


def _path(shop: Shop, path: str) -> str:
    return path.format(a=shop.design_a, image=shop.impression("shopper-1/a")[1][0])


@pytest.mark.parametrize(("method", "path", "options"), PROTECTED)
def test_no_key_is_401_with_www_authenticate_bearer(
    shop: Shop, nothing_sent: None, method: str, path: str, options: dict[str, Any]
) -> None:
    response = shop.service.client().request(method, _path(shop, path), **options)
    refused(shop, response, 401, "missing-credentials", "Authorization")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer not-a-key",
        "Bearer pfk_0123456789ab_wrong-secret",
        "Basic bTE6c2VjcmV0",  # not the bearer scheme
        "Bearer",
    ],
)
@pytest.mark.parametrize(("method", "path", "options"), PROTECTED)
def test_a_bad_key_is_401(
    shop: Shop, nothing_sent: None, authorization: str, method: str, path: str, options: dict[str, Any]
) -> None:
    client = shop.service.client()
    response = client.request(method, _path(shop, path), headers={"Authorization": authorization}, **options)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_key_with_a_known_id_and_a_wrong_secret_is_401(shop: Shop, nothing_sent: None) -> None:
    issued = shop.service.key("merchant", "m-1")
    forged = issued.key[:-4] + ("AAAA" if not issued.key.endswith("AAAA") else "BBBB")
    response = shop.service.client().get("/designs", headers={"Authorization": f"Bearer {forged}"})
    detail = refused(shop, response, 401, "invalid-key", "Authorization")
    assert "revoked" not in detail  # only the holder of the key learns that it was revoked


def test_keys_created_and_revoked_while_serving_count_from_the_next_request(shop: Shop) -> None:
    # Another process (`perfusion keys create`) writes the same file; the service reads it again.
    other_process = KeyStore(shop.service.keys.path)
    issued = other_process.create("merchant", "m-late")
    headers = issued.authorization
    assert shop.service.client().get("/designs", headers=headers).status_code == 200
    other_process.revoke(issued.stored.key_id)
    response = shop.service.client().get("/designs", headers=headers)
    detail = refused(shop, response, 401, "invalid-key", "Authorization")
    assert f"the key {issued.stored.key_id} was revoked" in detail
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_keys_are_stored_hashed_and_readable_by_their_owner_only(shop: Shop) -> None:
    issued = shop.service.key("shopper", "shopper-1")
    text = shop.service.keys.path.read_text()
    secret = issued.key.split("_", 2)[2]
    assert issued.stored.key_id in text and secret not in text and issued.key not in text
    assert shop.service.keys.path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/problems/duplicate-event-id"])
def test_health_metrics_and_problem_types_are_open(shop: Shop, path: str) -> None:
    assert shop.service.client().get(path).status_code == 200


# --------------------------------------------------------------------------------- each role, each action


def _request(shop: Shop, action: Action, role: str) -> httpx.Response:
    """The request of ``action`` as the role's principal would rightfully make it."""
    client = shop.client(role)
    operator = role == "operator"
    image = shop.impression("shopper-1/a")[1][0]
    if action == "create_design":
        body: dict[str, Any] = {"prompt": "a green skirt", "order_threshold": 2}
        return client.post("/designs", json={**body, "merchant_id": "m-1"} if operator else body)
    if action == "list_designs":
        return client.get("/designs")
    if action == "read_design":
        return client.get(f"/designs/{shop.design_a}")
    if action == "request_candidates":
        body = {"k": 1, "seed": 5}
        return client.post(f"/designs/{shop.design_a}/candidates", json={**body, "user_id": "x"} if operator else body)
    if action == "read_image":
        return client.get(f"/images/{image}")
    if action == "post_click":
        return client.post("/events", content=click(shop))
    if action == "post_select":
        return client.post("/events", content=select(shop))
    if action == "post_order":
        return client.post("/events", content=order(shop))
    placed = placed_order(shop, quantity=1)
    return client.post("/events", content=return_of(placed))


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(ALLOWED_ROLES))
def test_each_role_may_do_exactly_its_actions(shop: Shop, action: Action, role: str) -> None:
    before = len(shop.sink.events)
    response = _request(shop, action, role)
    if role in ALLOWED_ROLES[action]:
        assert 200 <= response.status_code < 300, response.text
        return
    detail = refused(shop, response, 403, "role-not-allowed", "Authorization")
    assert role.replace("_", " ") in detail
    # A refused return's order was placed (and sent) by the order system first; the return itself was not sent.
    sent = shop.sink.events[before:]
    assert all(e.kind == "order" for e in sent) and len(sent) == (action == "post_return")


# ---------------------------------------------------------------------------------------------------- designs


def test_a_merchant_creates_designs_as_themselves(shop: Shop) -> None:
    merchant = shop.client("merchant")
    for named in ({}, {"merchant_id": "m-1"}):
        response = merchant.post("/designs", json={"prompt": "a dress", "order_threshold": 2, **named})
        assert response.status_code == 201 and response.json()["merchant_id"] == "m-1"


def test_a_merchant_may_not_create_a_design_for_another(shop: Shop, nothing_sent: None) -> None:
    response = shop.client("merchant").post(
        "/designs", json={"merchant_id": "m-2", "prompt": "a dress", "order_threshold": 2}
    )
    refused(shop, response, 403, "not-your-resource", "merchant_id")


def test_an_operator_names_the_merchant_of_a_design(shop: Shop, nothing_sent: None) -> None:
    response = shop.client("operator").post("/designs", json={"prompt": "a dress", "order_threshold": 2})
    refused(shop, response, 422, "invalid-request", "merchant_id")


def test_a_merchant_lists_only_their_own_designs(shop: Shop) -> None:
    listed = shop.client("merchant").get("/designs").json()["designs"]
    assert listed and {design["merchant_id"] for design in listed} == {"m-1"}
    assert shop.design_b not in {design["design_id"] for design in listed}
    assert shop.client("merchant").get("/designs?merchant_id=m-1").status_code == 200
    response = shop.client("merchant").get("/designs?merchant_id=m-2")
    refused(shop, response, 403, "not-your-resource", "merchant_id")


def test_an_operator_lists_every_design_or_one_merchants(shop: Shop) -> None:
    every = {design["design_id"] for design in shop.client("operator").get("/designs").json()["designs"]}
    assert {shop.design_a, shop.design_b} <= every
    m2 = shop.client("operator").get("/designs?merchant_id=m-2").json()["designs"]
    assert [design["design_id"] for design in m2] == [shop.design_b]


def test_a_merchant_reads_only_their_own_designs(shop: Shop) -> None:
    assert shop.client("merchant").get(f"/designs/{shop.design_a}").status_code == 200
    response = shop.client("merchant").get(f"/designs/{shop.design_b}")
    refused(shop, response, 403, "not-your-resource", "design_id")
    assert shop.client("operator").get(f"/designs/{shop.design_b}").status_code == 200
    refused(shop, shop.client("merchant").get("/designs/design-nope"), 404, "not-found", "design_id")


# ------------------------------------------------------------------------------------------------- candidates


def test_a_shopper_is_served_any_design_for_themselves_only(shop: Shop, nothing_sent: None) -> None:
    shopper = shop.client("shopper")
    response = shopper.post(f"/designs/{shop.design_a}/candidates", json={"user_id": "shopper-2", "k": 1})
    refused(shop, response, 403, "not-your-resource", "user_id")


def test_a_merchant_reviews_only_their_own_designs_as_themselves(shop: Shop, nothing_sent: None) -> None:
    merchant = shop.client("merchant")
    response = merchant.post(f"/designs/{shop.design_b}/candidates", json={"k": 1})
    refused(shop, response, 403, "not-your-resource", "design_id")
    response = merchant.post(f"/designs/{shop.design_a}/candidates", json={"user_id": "shopper-1", "k": 1})
    refused(shop, response, 403, "not-your-resource", "user_id")


def test_shoppers_are_served_every_merchants_designs(shop: Shop) -> None:
    assert shop.shown["shopper-1/a"]["user_id"] == "shopper-1"
    response = shop.client("shopper").post(f"/designs/{shop.design_b}/candidates", json={"k": 1, "seed": 1})
    assert response.status_code == 200 and response.json()["user_id"] == "shopper-1"


def test_an_operator_previews_for_a_named_viewer(shop: Shop, nothing_sent: None) -> None:
    response = shop.client("operator").post(f"/designs/{shop.design_a}/candidates", json={"k": 1})
    refused(shop, response, 422, "invalid-request", "user_id")


# ------------------------------------------------------------------------------------------------------ images


def test_an_image_is_for_its_viewer_its_designs_merchant_and_operators(shop: Shop) -> None:
    image = shop.impression("shopper-1/a")[1][0]
    for role, principal in (("shopper", "shopper-1"), ("merchant", "m-1"), ("operator", "ops-1")):
        response = shop.client(role, principal).get(f"/images/{image}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", (role, principal)
    for role, principal in (("shopper", "shopper-2"), ("merchant", "m-2")):
        response = shop.client(role, principal).get(f"/images/{image}")
        refused(shop, response, 403, "not-your-resource", "image_id")
    refused(shop, shop.client("shopper").get("/images/gen-0000000000000000"), 404, "not-found", "image_id")


# ------------------------------------------------------------------------------------------------------ clicks


def test_a_shopper_clicks_candidates_of_impressions_served_to_them(shop: Shop) -> None:
    response = shop.client("shopper").post("/events", content=click(shop))
    assert response.status_code == 202, response.text
    assert shop.sink.events[-1].event_id == response.json()["event_id"]


@pytest.mark.parametrize(
    ("build", "status", "slug", "field"),
    [
        (lambda shop: click(shop, "shopper-2/a"), 403, "not-your-resource", "user_id"),
        (lambda shop: click(shop, "shopper-2/a", user_id="shopper-1"), 403, "not-your-resource", "impression_id"),
        (lambda shop: click(shop, image_id="gen-not-shown"), 422, "not-what-was-served", "image_id"),
        (lambda shop: click(shop, impression_id="imp-made-up"), 422, "not-what-was-served", "impression_id"),
        (lambda shop: click(shop, design_id="__b__"), 422, "not-what-was-served", "design_id"),
        (lambda shop: click(shop, design_id="design-nope"), 404, "not-found", "design_id"),
        (lambda shop: click(shop, kind="impression"), 422, "invalid-event", None),
    ],
    ids=["for-another-user", "on-anothers-impression", "not-a-candidate", "unknown-impression", "other-design",
         "unknown-design", "a-kind-the-service-produces"],
)  # fmt: skip
def test_a_shopper_may_not_click_what_was_not_served_to_them(
    shop: Shop, nothing_sent: None, build: Callable[[Shop], str], status: int, slug: str, field: str | None
) -> None:
    body = build(shop).replace("__b__", shop.design_b)
    refused(shop, shop.client("shopper").post("/events", content=body), status, slug, field)


# ------------------------------------------------------------------------------------------------- selections


def test_a_merchant_selects_candidates_of_their_own_review(shop: Shop) -> None:
    response = shop.client("merchant").post("/events", content=select(shop))
    assert response.status_code == 202, response.text


def test_a_merchant_may_not_select_for_a_design_that_is_not_theirs(shop: Shop, nothing_sent: None) -> None:
    # m-2 posting a select of m-1's design on m-1's review, as m-2: the design is not m-2's.
    body = select(shop, user_id="m-2")
    refused(shop, shop.client("merchant", "m-2").post("/events", content=body), 403, "not-your-resource", "design_id")
    # m-1 selecting on m-2's review of m-2's design.
    body = select(shop, "m-2/b", user_id="m-1")
    refused(shop, shop.client("merchant").post("/events", content=body), 403, "not-your-resource", "design_id")
    # m-1 selecting on a shopper's impression of m-1's own design.
    impression_id, image_ids = shop.impression("shopper-1/a")
    body = select(shop, impression_id=impression_id, image_ids=image_ids[:1])
    refused(shop, shop.client("merchant").post("/events", content=body), 403, "not-your-resource", "impression_id")
    # m-1 naming another merchant as the one who selects.
    body = select(shop, user_id="m-2")
    refused(shop, shop.client("merchant").post("/events", content=body), 403, "not-your-resource", "user_id")
    body = select(shop, image_ids=["gen-not-shown"])
    refused(shop, shop.client("merchant").post("/events", content=body), 422, "not-what-was-served", "image_ids")


# ----------------------------------------------------------------------------------------------------- orders


def test_the_order_system_reports_an_order_of_a_served_candidate(shop: Shop) -> None:
    body = order(shop, quantity=MAX_QUANTITY)
    response = shop.client("order_system").post("/events", content=body)
    assert response.status_code == 202, response.text
    sent = shop.sink.events[-1]
    assert sent.kind == "order" and sent.user_id == "shopper-1" and sent.event_id == json.loads(body)["event_id"]


def test_anonymous_orders_are_refused(shop: Shop, nothing_sent: None) -> None:
    anonymous = shop.service.client()
    refused(shop, anonymous.post("/events", content=order(shop, quantity=1000)), 401, "missing-credentials")
    for _ in range(5):
        body = order(shop, impression_id=f"imp-{uuid.uuid4().hex}")
        refused(shop, anonymous.post("/events", content=body), 401, "missing-credentials")


@pytest.mark.parametrize(
    ("changes", "status", "slug", "field"),
    [
        ({"quantity": MAX_QUANTITY + 1}, 422, "quantity-out-of-bounds", "quantity"),
        ({"quantity": 1000}, 422, "quantity-out-of-bounds", "quantity"),
        ({"quantity": 0}, 422, "invalid-event", None),
        ({"impression_id": "imp-no-such"}, 422, "not-what-was-served", "impression_id"),
        ({"user_id": "shopper-2"}, 422, "not-what-was-served", "impression_id"),  # shown to shopper-1
        ({"image_id": "gen-not-shown"}, 422, "not-what-was-served", "image_id"),
        ({"ts": 86_400.0}, 422, "timestamp-out-of-skew", "ts"),  # 1970
        ({"ts_from_now": SKEW_S + 60}, 422, "timestamp-out-of-skew", "ts"),  # stamped when the test runs
        ({"ts_from_now": -SKEW_S - 60}, 422, "timestamp-out-of-skew", "ts"),
    ],
    ids=["over-the-bound", "a-thousand", "zero", "no-impression", "another-shoppers-impression", "not-a-candidate",
         "stamped-1970", "in-the-future", "too-old"],
)  # fmt: skip
def test_an_order_must_be_of_what_was_served_now_and_bounded(
    shop: Shop, nothing_sent: None, changes: dict[str, Any], status: int, slug: str, field: str | None
) -> None:
    changes = dict(changes)
    if "ts_from_now" in changes:  # not at collection: a long session would carry the stamp into the skew
        changes["ts"] = time.time() + changes.pop("ts_from_now")
    payload = {**json.loads(order(shop)), **changes}
    response = shop.client("order_system").post("/events", content=json.dumps(payload))
    detail = refused(shop, response, status, slug, field)
    if slug == "quantity-out-of-bounds":
        assert f"1 to {MAX_QUANTITY}" in detail


def test_an_event_within_the_skew_is_accepted(shop: Shop) -> None:
    payload = {**json.loads(order(shop)), "ts": time.time() - SKEW_S + 30}
    assert shop.client("order_system").post("/events", content=json.dumps(payload)).status_code == 202


# ---------------------------------------------------------------------------------------------------- returns


def test_returns_of_an_order_add_up_to_its_quantity_at_most(shop: Shop) -> None:
    placed = placed_order(shop, quantity=2)
    system = shop.client("order_system")
    assert system.post("/events", content=return_of(placed, 1)).status_code == 202
    before = len(shop.sink.events)
    response = system.post("/events", content=return_of(placed, 2))
    detail = refused(shop, response, 422, "quantity-out-of-bounds", "quantity")
    assert "1 of 2" in detail and "at most 1" in detail
    assert system.post("/events", content=return_of(placed, 1)).status_code == 202
    refused(shop, system.post("/events", content=return_of(placed, 1)), 422, "quantity-out-of-bounds", "quantity")
    assert [e.kind for e in shop.sink.events[before:]] == ["return"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"order_id": "order-never-placed"}, "order_id"),
        ({"user_id": "shopper-2", "__impression__": "shopper-2/a"}, "order_id"),  # someone else's order
        ({"image_id": "__other_candidate__"}, "image_id"),
    ],
    ids=["unknown-order", "another-shoppers-order", "another-image"],
)
def test_a_return_names_a_kept_order_of_the_same_shopper(shop: Shop, changes: dict[str, Any], field: str) -> None:
    placed = placed_order(shop)
    changes = dict(changes)
    other = changes.pop("__impression__", None)
    if other is not None:  # shopper-2's own impression, so that only the order is not theirs
        changes["impression_id"], images = shop.impression(other)
        changes["image_id"] = images[0]
    if changes.get("image_id") == "__other_candidate__":
        changes["image_id"] = shop.impression("shopper-1/a")[1][1]
    before = len(shop.sink.events)
    response = shop.client("order_system").post("/events", content=return_of(placed, **changes))
    refused(shop, response, 422, "not-what-was-served", field)
    assert shop.sink.events[before:] == []


# -------------------------------------------------------------------------------------------------- event ids


def test_a_reused_event_id_is_409_and_the_first_event_stands(shop: Shop) -> None:
    first = json.loads(click(shop))
    assert shop.client("shopper").post("/events", content=json.dumps(first)).status_code == 202
    before = len(shop.sink.events)
    # Another user's order reusing the id: refused loudly instead of being dropped downstream as a repeat.
    reused = {**json.loads(order(shop)), "event_id": first["event_id"]}
    response = shop.client("order_system").post("/events", content=json.dumps(reused))
    refused(shop, response, 409, "duplicate-event-id", "event_id")
    # Ids of what the service produced are taken too.
    taken = {**json.loads(click(shop)), "event_id": shop.shown["shopper-1/a"]["impression_id"]}
    refused(shop, shop.client("shopper").post("/events", content=json.dumps(taken)), 409, "duplicate-event-id")
    assert shop.sink.events[before:] == []
    # Left out, the id is the service's: always new.
    fresh = json.loads(order(shop))
    del fresh["event_id"], fresh["ts"]
    response = shop.client("order_system").post("/events", content=json.dumps(fresh))
    assert response.status_code == 202 and response.json()["event_id"].startswith("evt-")


def test_an_unreadable_key_store_is_503_not_a_crash(tmp_path: Path, text_encoder: TextEncoder) -> None:
    service = build_service(tmp_path, tiny_generator(text_encoder), RecordingSink(), NoFeatures())
    issued = service.key("merchant", "m-1")
    service.keys.path.write_text("{not json")
    response = service.client().get("/designs", headers=issued.authorization)
    assert response.status_code == 503 and response.json()["type"] == "/problems/unavailable"
    assert str(service.keys.path) not in response.text


def test_the_auth_settings_are_a_section_of_the_service_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from service.settings import ServiceSettings

    monkeypatch.setenv("PERFUSION_SERVE_AUTH__KEYS_FILE", str(tmp_path / "keys.json"))
    monkeypatch.setenv("PERFUSION_SERVE_AUTH__MAX_QUANTITY", "7")
    auth = ServiceSettings.from_env().auth
    assert auth.resolved_keys_file() == tmp_path / "keys.json" and auth.max_quantity == 7
    assert auth == AuthSettings.from_env()  # `perfusion keys` reads the same variables
