"""The studio's and the storefront's pages and endpoints on the real app: the pages are public, every data call
needs a key, the designs on sale are for shoppers, and a checkout is an Order posted as the order system, through
every rule of ``POST /events``, only for a shopper buying from an impression served to them. The pages themselves
are driven in a real browser in tests/browser/."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from perfusion.contracts.records import Order
from perfusion.text_encoder import TextEncoder
from service.auth import AuthSettings
from service.pages import PAGES
from tests.service.test_service_api import (
    NoFeatures,
    RecordingSink,
    ServiceUnderTest,
    build_service,
    create_design,
    served_impression,
    tiny_generator,
)

MAX_QUANTITY = 100


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def service(tmp_path: Path, text_encoder: TextEncoder, sink: RecordingSink) -> ServiceUnderTest:
    return build_service(
        tmp_path, tiny_generator(text_encoder), sink, NoFeatures(), auth=AuthSettings(max_quantity=MAX_QUANTITY)
    )


@pytest.fixture
def no_order_sent(sink: RecordingSink) -> Iterator[None]:
    """The test's checkouts (all refused) hand no Order to the event sink (its designs go there as usual)."""
    yield
    assert [event for event in sink.events if isinstance(event, Order)] == []


def refused(response: httpx.Response, status: int, slug: str, field: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == f"/problems/{slug}" and problem["field"] == field, problem
    assert problem["detail"].startswith(f"{field}:"), problem
    return str(problem["detail"])


# ------------------------------------------------------------------------------------------------------- pages


@pytest.mark.parametrize("path", [*PAGES, "/web/common.js", "/web/studio.js", "/web/shop.js", "/web/style.css"])
def test_pages_and_their_files_are_public_and_run_only_their_own_scripts(service: ServiceUnderTest, path: str) -> None:
    response = service.client().get(path)
    assert response.status_code == 200, response.text
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    if path in PAGES:
        assert response.headers["content-type"].startswith("text/html")
        assert 'src="/web/common.js"' in response.text and "<script>" not in response.text


@pytest.mark.parametrize("name", ["nope.js", "studio.html", "..%2Fpages.py", "%2e%2e%2fapp.py"])
def test_only_the_pages_files_are_served(service: ServiceUnderTest, name: str) -> None:
    response = service.client().get(f"/web/{name}")
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_the_pages_are_not_part_of_the_api_schema(service: ServiceUnderTest) -> None:
    paths = service.client().get("/openapi.json").json()["paths"]
    assert not set(PAGES) & set(paths) and "/web/{name}" not in paths
    assert {"/whoami", "/shop/designs", "/shop/checkout"} <= set(paths)


# ----------------------------------------------------------------------------------------- whoami, designs on sale


@pytest.mark.parametrize("path", ["/whoami", "/shop/designs"])
def test_the_pages_data_needs_a_key(service: ServiceUnderTest, path: str) -> None:
    response = service.client().get(path)
    refused(response, 401, "missing-credentials", "Authorization")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("role", "principal"), [("merchant", "m-1"), ("shopper", "s-1"), ("order_system", "orders"), ("operator", "ops")]
)
def test_whoami_names_the_role_and_principal_of_the_key(service: ServiceUnderTest, role: str, principal: str) -> None:
    assert service.client(role, principal).get("/whoami").json() == {"role": role, "principal": principal}


def test_shoppers_see_every_design_on_sale_newest_first(service: ServiceUnderTest) -> None:
    older = create_design(service.merchant("m-1"), prompt="a red dress")
    newer = create_design(service.merchant("m-2"), prompt="a navy jacket")
    listed = service.shopper().get("/shop/designs").json()["designs"]
    assert [design["design_id"] for design in listed] == [newer, older]
    assert set(listed[0]) == {"design_id", "prompt", "created_ts"}  # not the merchant nor the threshold
    assert [d["design_id"] for d in service.shopper().get("/shop/designs?limit=1").json()["designs"]] == [newer]
    assert len(service.operator().get("/shop/designs").json()["designs"]) == 2


@pytest.mark.parametrize("role", ["merchant", "order_system"])
def test_merchants_and_the_order_system_do_not_list_the_designs_on_sale(service: ServiceUnderTest, role: str) -> None:
    create_design(service.merchant("m-2"), prompt="a navy jacket")
    detail = refused(service.client(role, "someone").get("/shop/designs"), 403, "role-not-allowed", "Authorization")
    assert "only an operator or a shopper may" in detail


# ---------------------------------------------------------------------------------------------------- checkout


def checkout_body(impression: Any, **changes: Any) -> dict[str, Any]:
    return {
        "impression_id": impression.event_id,
        "design_id": impression.design_id,
        "image_id": impression.candidates[0].image_id,
        **changes,
    }


def test_a_checkout_is_an_order_of_the_shopper_posted_as_the_order_system(
    service: ServiceUnderTest, sink: RecordingSink
) -> None:
    design = create_design(service.merchant())
    impression = served_impression(service, design, user_id="shopper-1")
    response = service.shopper("shopper-1").post("/shop/checkout", json=checkout_body(impression, quantity=2))
    assert response.status_code == 202, response.text
    accepted = response.json()
    (order,) = [event for event in sink.events if isinstance(event, Order)]
    assert order.event_id == accepted["order_id"] and order.user_id == "shopper-1" and order.quantity == 2
    assert (order.impression_id, order.design_id, order.image_id) == (
        impression.event_id,
        design,
        impression.candidates[0].image_id,
    )
    assert accepted["topic"] == "test.perfusion.events"
    kept = service.ledger.order(order.event_id)
    assert kept is not None and kept.user_id == "shopper-1" and kept.remaining == 2
    # The order system may take it back like any order it reported.
    returned = {**checkout_body(impression), "kind": "return", "user_id": "shopper-1"}
    returned.update(order_id=order.event_id, quantity=2)
    assert service.order_system().post("/events", json=returned).status_code == 202


def test_a_retried_checkout_with_its_id_does_not_order_twice(service: ServiceUnderTest, sink: RecordingSink) -> None:
    impression = served_impression(service, create_design(service.merchant()))
    body = checkout_body(impression, event_id=f"order-{uuid.uuid4().hex}")
    assert service.shopper().post("/shop/checkout", json=body).status_code == 202
    refused(service.shopper().post("/shop/checkout", json=body), 409, "duplicate-event-id", "event_id")
    assert sum(isinstance(event, Order) for event in sink.events) == 1


@pytest.mark.parametrize(("role", "principal"), [("merchant", "m-1"), ("order_system", "orders"), ("operator", "ops")])
def test_only_a_shopper_checks_out(service: ServiceUnderTest, no_order_sent: None, role: str, principal: str) -> None:
    impression = served_impression(service, create_design(service.merchant()), user_id=principal)
    response = service.client(role, principal).post("/shop/checkout", json=checkout_body(impression))
    assert "only a shopper may" in refused(response, 403, "role-not-allowed", "Authorization")


def test_a_checkout_needs_a_key(service: ServiceUnderTest, no_order_sent: None) -> None:
    impression = served_impression(service, create_design(service.merchant()))
    response = service.client().post("/shop/checkout", json=checkout_body(impression))
    refused(response, 401, "missing-credentials", "Authorization")


def test_a_shopper_buys_only_from_impressions_served_to_them(service: ServiceUnderTest, no_order_sent: None) -> None:
    impression = served_impression(service, create_design(service.merchant()), user_id="shopper-2")
    response = service.shopper("shopper-1").post("/shop/checkout", json=checkout_body(impression))
    refused(response, 403, "not-your-resource", "impression_id")


@pytest.mark.parametrize(
    ("changes", "status", "slug", "field"),
    [
        ({"quantity": MAX_QUANTITY + 1}, 422, "quantity-out-of-bounds", "quantity"),
        ({"image_id": "gen-not-a-candidate"}, 422, "not-what-was-served", "image_id"),
        ({"impression_id": "imp-never-served"}, 422, "not-what-was-served", "impression_id"),
        ({"design_id": "design-other"}, 404, "not-found", "design_id"),
        ({"quantity": 0}, 422, "invalid-request", "quantity"),
        ({"user_id": "shopper-2"}, 422, "invalid-request", "user_id"),
    ],
)
def test_a_checkout_keeps_every_rule_of_an_order(
    service: ServiceUnderTest,
    no_order_sent: None,
    changes: dict[str, Any],
    status: int,
    slug: str,
    field: str,
) -> None:
    impression = served_impression(service, create_design(service.merchant()))
    response = service.shopper().post("/shop/checkout", json=checkout_body(impression, **changes))
    refused(response, status, slug, field)


def test_a_checkout_of_another_design_than_its_impressions_is_refused(
    service: ServiceUnderTest, no_order_sent: None
) -> None:
    impression = served_impression(service, create_design(service.merchant()))
    other = create_design(service.merchant(), prompt="a navy jacket")
    response = service.shopper().post("/shop/checkout", json=checkout_body(impression, design_id=other))
    refused(response, 422, "not-what-was-served", "design_id")
