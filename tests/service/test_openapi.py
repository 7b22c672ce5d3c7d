"""The OpenAPI schema lists every status each API route can answer, each as problem details, so a client generated
from it knows the refusals (401, 403, 404, 409, 413, 422, 429, 503) of generation and events."""

from __future__ import annotations

from typing import Any

import pytest

from perfusion.text_encoder import TextEncoder
from service.problems import PROBLEM_TYPES
from tests.service.test_service_api import NoFeatures, RecordingSink, build_service, tiny_generator

ROUTE_STATUSES = {
    ("post", "/designs/{design_id}/candidates"): {401, 403, 404, 413, 422, 429, 503},
    ("post", "/events"): {401, 403, 404, 409, 413, 422, 429, 503},
    ("post", "/shop/checkout"): {401, 403, 404, 409, 413, 422, 429, 503},
    ("post", "/designs"): {401, 403, 413, 422, 503},
    ("get", "/designs/{design_id}"): {401, 403, 404, 422, 503},
    ("get", "/readyz"): {503},
    ("get", "/whoami"): {401},
    ("get", "/shop/designs"): {401, 403, 422},
}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory, text_encoder: TextEncoder) -> dict[str, Any]:
    service = build_service(
        tmp_path_factory.mktemp("openapi"), tiny_generator(text_encoder), RecordingSink(), NoFeatures()
    )
    return service.app.openapi()


@pytest.mark.parametrize(("method", "path"), list(ROUTE_STATUSES))
def test_each_route_lists_the_statuses_it_can_answer(schema: dict[str, Any], method: str, path: str) -> None:
    responses = schema["paths"][path][method]["responses"]
    listed = {int(status) for status in responses if int(status) >= 400}
    assert ROUTE_STATUSES[(method, path)] <= listed, listed
    for status in listed:
        assert responses[str(status)]["description"]
        assert responses[str(status)]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ProblemDetails"
        }


def test_every_listed_status_is_one_a_problem_type_answers(schema: dict[str, Any]) -> None:
    answered = {problem.status for problem in PROBLEM_TYPES.values()}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            for status in operation["responses"]:
                assert int(status) < 400 or int(status) in answered, (path, status)


def test_liveness_and_metrics_list_no_refusals(schema: dict[str, Any]) -> None:
    for path in ("/healthz", "/metrics"):
        assert all(int(status) < 400 for status in schema["paths"][path]["get"]["responses"]), path


def test_the_events_body_is_one_of_the_posted_kinds_told_apart_by_kind(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    mapping = body["discriminator"]["mapping"]
    assert body["discriminator"]["propertyName"] == "kind"
    assert set(mapping) == {"click", "order", "return", "select"}
    assert [entry["$ref"] for entry in body["oneOf"]] == list(mapping.values())
    components = schema["components"]["schemas"]
    for kind, ref in mapping.items():
        event = components[ref.rsplit("/", 1)[1]]
        assert event["properties"]["kind"]["const"] == kind
        assert "kind" in event["required"] and "event_id" not in event["required"] and "ts" not in event["required"]
        assert "user_id" not in event["required"]  # a shopper's or merchant's own id when left out
        assert event["additionalProperties"] is False
    assert {"quantity", "impression_id"} <= set(components["OrderEvent"]["required"])
