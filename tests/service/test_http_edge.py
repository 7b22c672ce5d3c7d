"""The service's HTTP edge: bodies over the limit refused with 413 while they stream in, no input answered with a
5xx, booleans never taken for numbers. The app is built from tiny real components as in test_service_api.py, and
requests are shopper-1's, who was served impression imp-1 of the design the events name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Message

from perfusion.text_encoder import TextEncoder
from service.app import MAX_BODY_BYTES
from service.limits import RateLimitSettings
from tests.service.test_service_api import (
    BrokenFeatureReader,
    RecordingSink,
    build_service,
    create_design,
    make_click,
    served_impression,
    tiny_generator,
)

CHUNK_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, text_encoder: TextEncoder) -> Iterator[tuple[TestClient, str]]:
    """Shopper-1's client for the module (these tests never generate) and a design to post events about; the
    events limit is far above the hundreds of hostile events the module posts (rate limits: test_rate_limits.py)."""
    service = build_service(
        tmp_path_factory.mktemp("edge"),
        tiny_generator(text_encoder),
        RecordingSink(),
        BrokenFeatureReader(),
        limits=RateLimitSettings(events_burst=100_000),
    )
    design_id = create_design(service.merchant())
    served_impression(service, design_id, impression_id="imp-1")
    yield service.shopper(), design_id


class CountingBody:
    """A request body streamed in chunks, counting how many chunks the server pulled."""

    def __init__(self, total_bytes: int) -> None:
        self.chunks = total_bytes // CHUNK_BYTES
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"x" * CHUNK_BYTES


# ------------------------------------------------------------------------------------------------- body limit


def test_a_streamed_body_over_the_limit_is_413_before_the_rest_is_read(edge: tuple[TestClient, str]) -> None:
    # Driven at the ASGI level (TestClient reads a streamed body whole before the app sees it), as uvicorn does: one
    # http.request message per chunk, no Content-Length (chunked transfer).
    client, _ = edge
    total_chunks = 800  # 50 MiB
    pulled = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * CHUNK_BYTES, "more_body": pulled < total_chunks}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/events",
        "raw_path": b"/events",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"transfer-encoding", b"chunked"),
            (b"authorization", client.headers["authorization"].encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": {},
    }
    asyncio.run(client.app(scope, receive, send))  # type: ignore[arg-type]
    start = next(message for message in sent if message["type"] == "http.response.start")
    assert start["status"] == 413
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    assert f"more than {MAX_BODY_BYTES} bytes" in json.loads(body)["detail"]
    # The limit is one chunk; the chunk that crossed it is the last one read.
    assert pulled <= MAX_BODY_BYTES // CHUNK_BYTES + 1 < total_chunks


def test_a_declared_length_over_the_limit_is_413_with_nothing_read(edge: tuple[TestClient, str]) -> None:
    client, design_id = edge
    body = CountingBody(50 * 1024 * 1024)
    response = client.post(
        f"/designs/{design_id}/candidates", content=body, headers={"content-length": str(50 * 1024 * 1024)}
    )
    assert response.status_code == 413 and body.pulled == 0
    assert client.post("/events", content=b"{}", headers={"content-length": "x1"}).status_code == 400
    text = client.get("/metrics").text
    assert 'route="/designs/{design_id}/candidates",status="413"' in text


def test_a_body_at_the_limit_is_read(edge: tuple[TestClient, str]) -> None:
    client, design_id = edge
    click = make_click(design_id)
    padded = json.dumps(click).encode()
    padded += b" " * (MAX_BODY_BYTES - len(padded))  # JSON allows trailing whitespace
    response = client.post("/events", content=padded)
    assert response.status_code == 202, response.text


# ------------------------------------------------------------------------------------------------- no 5xx


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("replace", "field"),
    [
        (("quantity", "9" * 5_000), "quantity"),
        (("image_id", deep_array(20_000)), "image_id"),
        (("impression_id", '{"a": ' * 5_000 + "1" + "}" * 5_000), "impression_id"),
        (("ts", "NaN"), "ts"),
        (("ts", "-Infinity"), "ts"),
        (("ts", "1e999"), "ts"),
        (("image_id", '"\\ud800"'), "image_id"),
        (("schema_version", "true"), "schema_version"),
        (("quantity", "true"), "quantity"),
    ],
)
def test_hostile_event_bodies_are_422_naming_the_field(
    edge: tuple[TestClient, str], replace: tuple[str, str], field: str
) -> None:
    client, design_id = edge
    name, raw_value = replace
    order = {**make_click(design_id), "kind": "order", "quantity": 1}
    order.pop(name, None)
    body = json.dumps(order)[:-1] + f', "{name}": {raw_value}}}'
    response = client.post("/events", content=body.encode())
    assert response.status_code == 422, response.text
    # The field leads the reason, after the event kind where the records' validation names it (order.quantity).
    named = response.json()["detail"].split(":")[0]
    assert named.split(".")[-1] == field, response.json()["detail"]


@pytest.mark.parametrize("body", [deep_array(20_000), "9" * 5_000, "", "null", "[]", '"x"', "\x80"])
def test_bodies_that_are_no_object_are_422(edge: tuple[TestClient, str], body: str) -> None:
    client, _ = edge
    response = client.post("/events", content=body.encode("utf-8", "surrogateescape"))
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    "image_id",
    ["gen-" + "0" * 300, "cat-" + "x" * 300, "x" * 252, "cat-dress-red-striped-short-slim-s" + "9" * 90],
)
def test_long_or_strange_image_ids_are_4xx_naming_the_field(edge: tuple[TestClient, str], image_id: str) -> None:
    client, _ = edge
    response = client.get(f"/images/{image_id}")
    assert 400 <= response.status_code < 500, response.text
    if len(image_id) > 128:
        assert response.status_code == 422 and response.json()["detail"].startswith("image_id:")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/designs", {"merchant_id": "m", "prompt": "a dress", "order_threshold": True}, "order_threshold"),
        ("/designs", {"merchant_id": "m", "prompt": "a dress", "order_threshold": "3"}, "order_threshold"),
        ("/designs/{design}/candidates", {"user_id": "u", "k": True}, "k"),
        ("/designs/{design}/candidates", {"user_id": "u", "seed": False}, "seed"),
    ],
)
def test_booleans_and_strings_are_not_numbers_in_requests(
    edge: tuple[TestClient, str], path: str, body: dict[str, Any], field: str
) -> None:
    client, design_id = edge
    response = client.post(path.format(design=design_id), json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}:")


@pytest.mark.parametrize("path", ["/designs", "/designs/{design}/candidates"])
@pytest.mark.parametrize("raw", [deep_array(20_000), '{"k": ' + "9" * 5_000 + "}", "{", "\x80"])
def test_hostile_request_bodies_are_4xx(edge: tuple[TestClient, str], path: str, raw: str) -> None:
    client, design_id = edge
    response = client.post(
        path.format(design=design_id),
        content=raw.encode("utf-8", "surrogateescape"),
        headers={"content-type": "application/json"},
    )
    assert 400 <= response.status_code < 500, response.text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["kind", "event_id", "ts", "quantity", "image_ids", "schema_version"]), value=json_values)
def test_any_json_in_any_field_of_an_event_is_never_a_5xx(
    edge: tuple[TestClient, str], field: str, value: object
) -> None:
    client, design_id = edge
    event: dict[str, Any] = {**make_click(design_id), field: value}
    response = client.post("/events", content=json.dumps(event, allow_nan=True).encode())
    # 409: an event_id drawn twice is refused the second time.
    assert response.status_code in (202, 404, 409, 422), response.text


def test_events_path_still_accepts_a_good_event_after_hostile_ones(edge: tuple[TestClient, str]) -> None:
    client, design_id = edge
    client.post("/events", content=deep_array(20_000).encode())
    response = client.post("/events", content=json.dumps(make_click(design_id)).encode())
    assert response.status_code == 202, response.text
