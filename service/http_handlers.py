"""What every request of the service passes through besides its route: the request metrics middleware, and the
exception handlers that answer every error as RFC 9457 problem details (:mod:`service.problems`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from perfusion.image_store import UnknownImage
from service.auth import KeyStoreError
from service.designs import UnknownDesign
from service.events import EventSinkUnavailable
from service.features import FeatureStoreUnavailable
from service.generation_pool import GenerationBusy
from service.metrics import ServiceMetrics
from service.problems import Refusal, problem_response, problem_type, refusal_response
from service.prompts import PromptNotDrawable

logger = logging.getLogger(__name__)


def with_members(response: JSONResponse, members: dict[str, Any]) -> JSONResponse:
    """``response`` (problem details) with extension members added."""
    content = {**json.loads(bytes(response.body)), **members}
    extended = JSONResponse(status_code=response.status_code, content=content, media_type=response.media_type)
    for name, value in response.headers.items():
        if name.lower() not in ("content-length", "content-type"):
            extended.headers[name] = value
    return extended


def _route_template(request: Request) -> str:
    """The matched route's path template (``/designs/{design_id}``), so metrics labels stay few."""
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", request.url.path))
    return "unmatched"


def install_metrics_middleware(app: FastAPI, metrics: ServiceMetrics) -> None:
    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = _route_template(request)
            metrics.requests.labels(method=request.method, route=route, status=str(status)).inc()
            metrics.request_seconds.labels(method=request.method, route=route).observe(time.perf_counter() - started)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
        field = ".".join(location) or "body"
        received = error.get("input")
        shown = "" if isinstance(received, dict) or received is None else f" (got {_short(received)})"
        parts.append(f"{field}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Every error the service answers as problem details (``service.problems``)."""

    def problem(slug: str, detail: str, field: str | None = None) -> JSONResponse:
        return problem_response(problem_type(slug), detail, field)

    @app.exception_handler(Refusal)
    async def refused(_: Request, exc: Refusal) -> JSONResponse:
        return refusal_response(exc)

    @app.exception_handler(PromptNotDrawable)
    async def not_drawable(_: Request, exc: PromptNotDrawable) -> JSONResponse:
        return with_members(refusal_response(exc), exc.verdict.extensions())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = _validation_detail(exc)
        return problem("invalid-request", detail, detail.split(":", 1)[0] if ":" in detail else None)

    @app.exception_handler(UnknownDesign)
    async def unknown_design(_: Request, exc: UnknownDesign) -> JSONResponse:
        return problem("not-found", f"design_id: {exc}", "design_id")

    @app.exception_handler(UnknownImage)
    async def unknown_image(_: Request, exc: UnknownImage) -> JSONResponse:
        detail = str(exc)
        return problem("not-found", detail if detail.startswith("image_id:") else f"image_id: {detail}", "image_id")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unmatched routes and methods, and the body limit's 413 raised while the body streams in.
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(exc.status_code, "bad-request")
        return problem_response(problem_type(slug), str(exc.detail), headers=exc.headers, status=exc.status_code)

    @app.exception_handler(EventSinkUnavailable)
    async def kafka_unavailable(_: Request, exc: EventSinkUnavailable) -> JSONResponse:
        logger.warning("answering 503: %s", exc)
        return problem("unavailable", f"Kafka unavailable: {exc}")

    @app.exception_handler(GenerationBusy)
    async def generation_busy(_: Request, exc: GenerationBusy) -> JSONResponse:
        metrics.generation_refused.inc()
        response = problem("unavailable", f"generation busy: {exc}")
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(KeyStoreError)
    async def key_store_unreadable(_: Request, exc: KeyStoreError) -> JSONResponse:
        logger.error("answering 503, the key store is unreadable: %s", exc)
        return problem("unavailable", "the service cannot read its API keys; an operator must repair the key store")

    @app.exception_handler(FeatureStoreUnavailable)
    async def feast_unavailable(_: Request, exc: FeatureStoreUnavailable) -> JSONResponse:
        logger.warning("answering 503: %s", exc)
        return problem("unavailable", f"Feast unavailable: {exc}")
