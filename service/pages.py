"""The merchant studio and the storefront: the pages a browser opens, and the JSON endpoints only they need.

``GET /studio`` and ``GET /shop`` answer plain HTML, and ``GET /web/<file>`` the few hand-written scripts and the
style sheet beside them (``service/web/``); these are public, as a shop's pages are. Every call the pages make is
an API call with the key the visitor signed in with (``Authorization: Bearer``, kept in the tab's sessionStorage),
under the same rules as any client's: the studio uses ``GET /designs``, ``POST /designs``,
``POST /designs/{id}/candidates``, ``GET /images/{id}``, ``POST /events`` (select) and polls ``GET /designs/{id}``
for net orders and production; the storefront uses the candidates, images and events (click) endpoints, and these:

- ``GET /whoami``: the role and principal of the caller's key, so a page can tell a shopper's key from a
  merchant's before it acts;
- ``GET /shop/designs``: the designs on sale, newest first, for shoppers (and operators); merchants list only their
  own (``GET /designs``), so they get 403 here;
- ``POST /shop/checkout``: a shopper buys a candidate of an impression served to them. Orders reach Kafka only
  from the order system (:mod:`service.access`): the checkout checks that the caller is a shopper and the
  impression theirs (403 otherwise), then posts the Order as the order system, :data:`CHECKOUT_ORDER_SYSTEM`,
  through the same admission as ``POST /events`` (:class:`service.admission.EventAdmission`: clock, quantity bound,
  design, impression shown to that shopper, candidate of it, unique event id). Nothing refused reaches Kafka.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, params
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from perfusion.contracts.records import Order
from service.access import ROLE_TEXT
from service.auth import Caller, Principal, Role
from service.designs import DesignRegistry
from service.ledger import EventLedger, PostedEvent
from service.problems import Refusal
from service.schemas import Identifier, RequestBody

WEB_DIR: Final = Path(__file__).with_name("web")
PAGES: Final[Mapping[str, str]] = {"/studio": "studio.html", "/shop": "shop.html"}
ASSET_TYPES: Final[Mapping[str, str]] = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}
# The pages run only their own scripts and show only images they fetched with the key (blob: URLs), so that a
# prompt or a problem detail shown on a page can never run as script.
PAGE_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CHECKOUT_ORDER_SYSTEM: Final = Principal(role="order_system", id="storefront-checkout", key_id="storefront")
"""Who posts a storefront checkout's Order: the order system, as the service's own checkout speaks for it."""
MAX_LISTED_DESIGNS: Final = 100

PostEvent = Callable[[Principal, bytes], PostedEvent]
"""Admit a posted event (JSON bytes) for a principal and produce it to Kafka, or raise a refusal."""


class WhoAmI(BaseModel):
    role: Role
    principal: str = Field(description="the merchant id, shopper user id, order system or operator name")


class ListedDesign(BaseModel):
    design_id: str
    prompt: str
    created_ts: float


class ListedDesigns(BaseModel):
    designs: list[ListedDesign] = Field(description="the designs on sale, newest first")


class Checkout(RequestBody):
    impression_id: Identifier = Field(description="the impression served to you (POST /designs/{id}/candidates)")
    design_id: Identifier = Field(description="the impression's design")
    image_id: Identifier = Field(description="the candidate you buy, one of the impression's")
    quantity: int = Field(default=1, ge=1, le=1000, description="units; at most the service's bound per order")
    event_id: Identifier | None = Field(
        default=None,
        description="the order's id, to retry a checkout without ordering twice (a used one is 409); left out, the "
        "service assigns one",
    )


class CheckoutAccepted(BaseModel):
    order_id: str = Field(description="the Order's event id (a return names it)")
    design_id: str
    impression_id: str
    image_id: str
    quantity: int
    ts: float
    topic: str = Field(description="the Kafka topic the Order went to")


def pages_router(
    *,
    designs: DesignRegistry,
    ledger: EventLedger,
    post_event: PostEvent,
    events_topic: str,
    checkout_dependencies: Sequence[params.Depends] = (),
    checkout_responses: Mapping[int | str, dict[str, Any]] | None = None,
    key_responses: Mapping[int | str, dict[str, Any]] | None = None,
    listing_responses: Mapping[int | str, dict[str, Any]] | None = None,
) -> APIRouter:
    """The pages, their files and the storefront's endpoints; ``post_event`` is the app's admission and producer
    of ``POST /events``, by which the checkout's Order goes to Kafka. ``checkout_dependencies`` run before a
    checkout (the app's rate limit); ``checkout_responses``, ``key_responses`` (``GET /whoami``) and
    ``listing_responses`` (``GET /shop/designs``) are the problem statuses their schemas list."""
    router = APIRouter()
    files = {path.name: path.read_bytes() for path in WEB_DIR.iterdir() if path.suffix in ASSET_TYPES}

    def web_file(name: str) -> Response:
        return Response(content=files[name], media_type=ASSET_TYPES[Path(name).suffix], headers=dict(PAGE_HEADERS))

    def page(file_name: str) -> Callable[[], Awaitable[Response]]:
        async def serve_page() -> Response:
            return web_file(file_name)

        return serve_page

    for page_path, file_name in PAGES.items():
        router.add_api_route(page_path, page(file_name), methods=["GET"], include_in_schema=False)

    @router.get("/web/{name}", include_in_schema=False, response_class=Response)
    async def web_asset(name: str) -> Response:
        if name not in files or name.endswith(".html"):
            known = ", ".join(sorted(n for n in files if not n.endswith(".html")))
            raise StarletteHTTPException(404, f"name: no file {name!r} under /web/; the pages use {known}")
        return web_file(name)

    @router.get("/whoami", response_model=WhoAmI, responses=dict(key_responses or {}))
    async def whoami(principal: Caller) -> WhoAmI:
        return WhoAmI(role=principal.role, principal=principal.id)

    @router.get("/shop/designs", response_model=ListedDesigns, responses=dict(listing_responses or {}))
    def listed_designs(
        principal: Caller,
        limit: Annotated[int, Query(ge=1, le=MAX_LISTED_DESIGNS, description="most designs answered")] = 24,
    ) -> ListedDesigns:
        _require_role(principal, ("shopper", "operator"), "list the designs on sale (GET /shop/designs)")
        newest = sorted(designs.designs_of(), key=lambda design: design.created_ts, reverse=True)[:limit]
        return ListedDesigns(
            designs=[
                ListedDesign(design_id=design.design_id, prompt=design.prompt, created_ts=design.created_ts)
                for design in newest
            ]
        )

    def check_out(principal: Principal, body: Checkout) -> PostedEvent:
        _require_role(principal, ("shopper",), "check out (POST /shop/checkout)")
        served = ledger.impression(body.impression_id)
        if served is not None and served.user_id != principal.id:
            raise Refusal(
                "not-your-resource",
                f"impression_id: {body.impression_id!r} was served to another user, not to you "
                f"({principal.describe()}); buy from impressions served to you",
                field="impression_id",
            )
        order = {
            "kind": "order",
            "user_id": principal.id,
            "impression_id": body.impression_id,
            "design_id": body.design_id,
            "image_id": body.image_id,
            "quantity": body.quantity,
        }
        if body.event_id is not None:
            order["event_id"] = body.event_id
        # Every rule of an order posted by the order system applies from here, and the admitted Order is produced.
        return post_event(CHECKOUT_ORDER_SYSTEM, json.dumps(order).encode())

    @router.post(
        "/shop/checkout",
        response_model=CheckoutAccepted,
        status_code=202,
        dependencies=list(checkout_dependencies),
        responses=dict(checkout_responses or {}),
    )
    async def checkout(body: Checkout, principal: Caller) -> CheckoutAccepted:
        # The ledger's checks and the wait for the broker's acknowledgement block: off the event loop.
        event = await run_in_threadpool(check_out, principal, body)
        assert isinstance(event, Order)  # the checkout posts nothing else
        return CheckoutAccepted(
            order_id=event.event_id,
            design_id=event.design_id,
            impression_id=event.impression_id,
            image_id=event.image_id,
            quantity=event.quantity,
            ts=event.ts,
            topic=events_topic,
        )

    return router


def _require_role(principal: Principal, allowed: tuple[Role, ...], action_text: str) -> None:
    """Refuse with 403 ``role-not-allowed`` unless ``principal``'s role is one of ``allowed``."""
    if principal.role not in allowed:
        who = " or ".join(ROLE_TEXT[role] for role in sorted(allowed))
        raise Refusal(
            "role-not-allowed",
            f"Authorization: {principal.describe()} may not {action_text}; only {who} may: send such a principal's key",
            field="Authorization",
        )
