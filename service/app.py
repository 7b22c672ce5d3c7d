"""The generator service's FastAPI app, built by :func:`create_app` from the components it is given.

Every dependency comes in through the factory (generator, event sink, feature reader, design registry, image
store, metrics, background followers), so tests build the app from real small components and ``perfusion serve``
builds it from the real ones. Errors map to status codes in one place (:func:`_install_error_handlers`):

- bad input (validation, unknown design or image, malformed event): 4xx whose ``detail`` names the field and the fix;
  no input, however hostile, gives a 5xx (:mod:`service.event_body`); a body over the limit is 413;
- Kafka or Feast unavailable: 503 whose ``detail`` gives the reason; the request's effects are not kept;
- generation pool full: 503 with ``Retry-After`` (:mod:`service.generation_pool`).

Candidate generation runs on a bounded pool of its own (a fixed number of worker threads, a bounded queue), and
``/healthz`` and ``/metrics`` are ``async`` endpoints that never wait on a thread, so they answer under any
generation load. Request bodies are limited while they stream in (:mod:`service.body_limit`).
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.routing import Match

from perfusion.contracts.records import (
    Candidate,
    Click,
    DesignCreated,
    Impression,
    InvalidEvent,
    Order,
    Return,
    Select,
    parse_event,
)
from perfusion.follower import TopicFollower
from perfusion.image_store import ImageStore, UnknownImage
from service.body_limit import BodySizeLimit
from service.designs import DesignRegistry, UnknownDesign
from service.event_body import EventBodyRefused, check_event_body
from service.events import EventSink, EventSinkUnavailable
from service.features import FeatureReader, FeatureStoreUnavailable, user_condition
from service.generation_pool import GenerationBusy, GenerationPool, GenerationPoolSettings
from service.generator import CandidateGenerator
from service.metrics import METRICS_CONTENT_TYPE, ServiceMetrics
from service.schemas import (
    MAX_ID_CHARS,
    CandidateOut,
    CandidatesRequest,
    CandidatesResponse,
    CreateDesign,
    DesignCreatedResponse,
    DesignStatusResponse,
    ErrorResponse,
    EventAccepted,
    Health,
    Personalization,
)

logger = logging.getLogger(__name__)

# The events a client may post; designs and impressions are produced by the service itself.
ACCEPTED_EVENT_TYPES = (Click, Order, Return, Select)
ACCEPTED_EVENT_KINDS = ", ".join(event_type.model_fields["kind"].default for event_type in ACCEPTED_EVENT_TYPES)
# Every request body (an event, a design, a candidates request) is a few hundred bytes; anything over this is
# refused with 413 while it is being read.
MAX_BODY_BYTES = 64 * 1024
DEMAND_SOURCE = (
    "followed from Kafka: Order/Return events on {events_topic} (deduplicated by event_id) and ProductionOrder "
    "records on {production_topic} from the stream worker's demand agent"
)


class BackgroundTask(Protocol):
    """A follower the app starts with itself and stops on shutdown (model watcher, demand follower)."""

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


@runtime_checkable
class FollowsTopics(Protocol):
    """A background task that reads Kafka through topic followers, whose counts ``/metrics`` exports."""

    def topic_followers(self) -> list[TopicFollower]: ...


class BadEvent(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def create_app(
    *,
    generator: CandidateGenerator,
    event_sink: EventSink,
    feature_reader: FeatureReader,
    designs: DesignRegistry,
    images: ImageStore,
    events_topic: str,
    production_topic: str,
    metrics: ServiceMetrics | None = None,
    background: Sequence[BackgroundTask] = (),
    generation: GenerationPoolSettings | None = None,
) -> FastAPI:
    """The service's app; ``background`` tasks are started and stopped with the app's lifespan, and candidate
    generation runs on a pool of ``generation`` (default :class:`GenerationPoolSettings`)."""
    service_metrics = metrics if metrics is not None else ServiceMetrics()
    pool = GenerationPool(generation)
    following = [task for task in background if isinstance(task, FollowsTopics)]
    service_metrics.follow_counts_of(lambda: [follower for task in following for follower in task.topic_followers()])
    service_metrics.set_model_version(generator.model_version)
    started = time.monotonic()
    demand_source = DEMAND_SOURCE.format(events_topic=events_topic, production_topic=production_topic)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for task in background:
            task.start()
        try:
            yield
        finally:
            for task in reversed(background):
                task.stop()

    app = FastAPI(
        title="PerFusion generator service",
        description="Personalized candidate groups for merchants' text designs, with events logged to Kafka.",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.state.metrics = service_metrics
    # Added before the metrics middleware, which therefore wraps it and counts the 413s it answers.
    app.add_middleware(BodySizeLimit, limit_bytes=MAX_BODY_BYTES)
    _install_metrics_middleware(app, service_metrics)
    _install_error_handlers(app, service_metrics)

    def produce(event: DesignCreated | Impression | Click | Order | Return | Select) -> None:
        try:
            event_sink.send(event)
        except EventSinkUnavailable:
            service_metrics.kafka_errors.labels(operation="produce").inc()
            raise

    @app.post("/designs", response_model=DesignCreatedResponse, status_code=201)
    def create_design(body: CreateDesign) -> DesignCreatedResponse:
        design = designs.create(body.merchant_id, body.prompt, body.order_threshold)
        event = DesignCreated(
            event_id=f"evt-{uuid.uuid4().hex}",
            ts=design.created_ts,
            user_id=body.merchant_id,
            design_id=design.design_id,
            prompt=design.prompt,
            order_threshold=design.order_threshold,
        )
        try:
            produce(event)
        except EventSinkUnavailable:
            designs.delete(design.design_id)  # no design exists that the topics never heard of
            raise
        return DesignCreatedResponse(
            design_id=design.design_id,
            merchant_id=design.merchant_id,
            prompt=design.prompt,
            order_threshold=design.order_threshold,
        )

    @app.get("/designs/{design_id}", response_model=DesignStatusResponse)
    def design_status(design_id: str) -> DesignStatusResponse:
        status = designs.status(design_id)
        return DesignStatusResponse(
            design_id=status.design.design_id,
            merchant_id=status.design.merchant_id,
            prompt=status.design.prompt,
            order_threshold=status.design.order_threshold,
            net_orders=status.net_orders,
            production_triggered=status.production_triggered,
            production_ts=status.production_ts,
            demand_source=demand_source,
        )

    def generate_impression(design_id: str, body: CandidatesRequest) -> tuple[Impression, Personalization, int]:
        """The blocking part of a candidates request, run on the generation pool: read the user's features,
        generate, store the images and produce the Impression. Returns it with the personalization and the seed."""
        design = designs.get(design_id)
        read_started = time.perf_counter()
        try:
            features = feature_reader.read(body.user_id)
        except FeatureStoreUnavailable:
            service_metrics.feast_errors.inc()
            raise
        service_metrics.feast_read_seconds.observe(time.perf_counter() - read_started)
        personalization, user_vector = user_condition(features)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)

        generation_started = time.perf_counter()
        group = generator.generate(design.prompt, user_vector, body.k, seed)
        service_metrics.generation_seconds.labels(personalization=personalization).observe(
            time.perf_counter() - generation_started
        )
        image_ids = [images.put(pixels) for pixels in group.images]
        impression = Impression(
            event_id=f"imp-{uuid.uuid4().hex}",
            ts=time.time(),
            user_id=body.user_id,
            design_id=design.design_id,
            prompt=design.prompt,
            model_version=group.model_version,
            candidates=[
                Candidate(image_id=image_id, position=position, descriptor=descriptor)
                for position, (image_id, descriptor) in enumerate(zip(image_ids, group.descriptors, strict=True))
            ],
        )
        produce(impression)
        service_metrics.candidates.labels(personalization=personalization).inc(body.k)
        return impression, personalization, seed

    @app.post("/designs/{design_id}/candidates", response_model=CandidatesResponse)
    async def candidates(design_id: str, body: CandidatesRequest, request: Request) -> CandidatesResponse:
        impression, personalization, seed = await pool.run(lambda: generate_impression(design_id, body))
        return CandidatesResponse(
            impression_id=impression.event_id,
            design_id=impression.design_id,
            user_id=impression.user_id,
            model_version=impression.model_version,
            personalization=personalization,
            seed=seed,
            candidates=[
                CandidateOut(
                    image_id=candidate.image_id,
                    url=str(request.url_for("image", image_id=candidate.image_id)),
                    position=candidate.position,
                    descriptor=candidate.descriptor,
                )
                for candidate in impression.candidates
            ],
        )

    @app.get("/images/{image_id}", name="image", response_class=Response)
    def image(image_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]) -> Response:
        return Response(content=images.png_bytes(image_id), media_type="image/png")

    @app.post("/events", response_model=EventAccepted, status_code=202)
    async def post_event(request: Request) -> EventAccepted:
        raw = await request.body()  # at most MAX_BODY_BYTES: BodySizeLimit refused longer bodies while reading
        try:
            check_event_body(raw)
            event = parse_event(raw)
        except (EventBodyRefused, InvalidEvent) as exc:
            raise BadEvent(exc.reason) from None
        if not isinstance(event, ACCEPTED_EVENT_TYPES):
            raise BadEvent(f"kind: {event.kind!r} is produced by the service; post one of {ACCEPTED_EVENT_KINDS}")
        if not designs.exists(event.design_id):
            raise UnknownDesign(f"design_id: no design {event.design_id!r}; use an id returned by POST /designs")
        # kafka-python blocks until the broker acknowledges: keep it off the event loop.
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(produce, event)
        return EventAccepted(event_id=event.event_id, kind=event.kind, topic=events_topic)

    # Both async: they run on the event loop itself, so no thread pool, however busy, can hold them up.
    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", model_version=generator.model_version, uptime_s=time.monotonic() - started)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        service_metrics.set_model_version(generator.model_version)
        service_metrics.generation_admitted.set(pool.admitted)
        return Response(content=service_metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


def _route_template(request: Request) -> str:
    """The matched route's path template (``/designs/{design_id}``), so metrics labels stay few."""
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(route, "path", request.url.path))
    return "unmatched"


def _install_metrics_middleware(app: FastAPI, metrics: ServiceMetrics) -> None:
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


def _install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    def error(status_code: int, detail: str) -> JSONResponse:
        return JSONResponse(status_code=status_code, content={"detail": detail})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, _validation_detail(exc))

    @app.exception_handler(BadEvent)
    async def invalid_event(_: Request, exc: BadEvent) -> JSONResponse:
        return error(422, exc.reason)

    @app.exception_handler(UnknownDesign)
    async def unknown_design(_: Request, exc: UnknownDesign) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(UnknownImage)
    async def unknown_image(_: Request, exc: UnknownImage) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(EventSinkUnavailable)
    async def kafka_unavailable(_: Request, exc: EventSinkUnavailable) -> JSONResponse:
        logger.warning("answering 503: %s", exc)
        return error(503, f"Kafka unavailable: {exc}")

    @app.exception_handler(GenerationBusy)
    async def generation_busy(_: Request, exc: GenerationBusy) -> JSONResponse:
        metrics.generation_refused.inc()
        response = error(503, f"generation busy: {exc}")
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(FeatureStoreUnavailable)
    async def feast_unavailable(_: Request, exc: FeatureStoreUnavailable) -> JSONResponse:
        logger.warning("answering 503: %s", exc)
        return error(503, f"Feast unavailable: {exc}")
