"""The generator service's FastAPI app, built by :func:`create_app` from the components it is given.

Every dependency comes in through the factory (generator, event sink, feature reader, design registry, image
store, API keys, ledger, metrics, background followers), so tests build the app from real small components and
``perfusion serve`` builds it from the real ones.

Every endpoint but ``/healthz``, ``/readyz``, ``/metrics`` and ``/problems/{slug}`` needs an API key
(``Authorization: Bearer``, :mod:`service.auth`); what each role may do is :mod:`service.access`, and what a posted
event must satisfy is :mod:`service.admission`. Errors are RFC 9457 problem details (:mod:`service.problems`),
mapped in one place (:func:`service.http_handlers.install_error_handlers`):

- no key or a bad one: 401 with ``WWW-Authenticate: Bearer``; a role or a resource that is not the caller's: 403;
- bad input (validation, unknown design or image, malformed event, a rule of a posted event): 4xx whose ``detail``
  names the field and the fix; a reused event id is 409; no input, however hostile, gives a 5xx
  (:mod:`service.event_body`); a body over the limit is 413;
- Kafka or Feast unavailable: 503 whose ``detail`` gives the reason; the request's effects are not kept;
- a prompt the model cannot draw (words it does not know, more tokens than its text encoder reads): 422
  (:mod:`service.prompts`), for a new design and for generation from a stored one;
- a principal over its rate limit on generation or events: 429 with ``Retry-After`` (:mod:`service.limits`);
- generation pool full: 503 with ``Retry-After`` (:mod:`service.generation_pool`).

Nothing refused reaches Kafka: every check runs before the event is produced. Each route lists the statuses it can
answer in its OpenAPI ``responses`` (:data:`PROBLEM_STATUS_TEXT`).

``/healthz`` is liveness only; ``/readyz`` checks Kafka, Feast and the model (:mod:`service.readiness`).

The studio's and the storefront's pages (:mod:`service.pages`) are public too; every call they make is an API
call with the signed-in key.

Candidate generation runs on a bounded pool of its own (a fixed number of worker threads, a bounded queue), and
``/healthz`` and ``/metrics`` are ``async`` endpoints that never wait on a thread, so they answer under any
generation load. Request bodies are limited while they stream in (:mod:`service.body_limit`).
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol, runtime_checkable

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from perfusion.contracts.records import Candidate, Click, DesignCreated, Impression, Order, Return, Select
from perfusion.contracts.topics import TopicNames
from perfusion.errors import ConfigError
from perfusion.follower import TopicFollower
from perfusion.image_store import ImageStore, UnknownImage
from service.access import acting_for, require, require_image_access, require_own_design
from service.admission import EventAdmission
from service.auth import AuthSettings, Caller, KeyStore, Principal
from service.body_limit import BodySizeLimit
from service.designs import MAX_DESIGNS_PAGE, Design, DesignRegistry, decode_cursor, encode_cursor
from service.event_body import posted_event_request_body, posted_event_schemas
from service.events import EventSink, EventSinkUnavailable
from service.features import FeatureReader, FeatureStoreUnavailable, user_condition
from service.generation_pool import GenerationPool, GenerationPoolSettings
from service.generator import CandidateGenerator, GeneratedGroup
from service.http_handlers import install_error_handlers, install_metrics_middleware, with_members
from service.ledger import EventLedger
from service.limits import EndpointClass, RateLimiter, RateLimitSettings
from service.metrics import METRICS_CONTENT_TYPE, ServiceMetrics
from service.pages import pages_router
from service.problems import PROBLEM_TYPES, Refusal, problem_response, problem_type
from service.prompts import CountsTokens, PromptCheck
from service.readiness import Readiness, ReadinessSettings, Ready, reachability_check
from service.schemas import (
    MAX_ID_CHARS,
    CandidateOut,
    CandidatesRequest,
    CandidatesResponse,
    CreateDesign,
    DesignCreatedResponse,
    DesignList,
    DesignStatusResponse,
    DesignSummary,
    EventAccepted,
    Health,
    Personalization,
    ProblemDetails,
    ProblemTypeDescription,
)

logger = logging.getLogger(__name__)

IdPath = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]
# Every request body (an event, a design, a candidates request) is a few hundred bytes; anything over this is
# refused with 413 while it is being read.
MAX_BODY_BYTES = 64 * 1024
# What each status a route can answer means, for its OpenAPI ``responses`` (every one is problem details).
PROBLEM_STATUS_TEXT: dict[int, str] = {
    401: "no API key, or one that is unknown, malformed or revoked (WWW-Authenticate: Bearer)",
    403: "the caller's role may not do this, or the resource is someone else's",
    404: "no such design, impression or image",
    409: "the event id was used before",
    413: "the request body is over the service's limit",
    422: "the body breaks a rule (a field's type or bound, a prompt the model cannot draw, an event that does not "
    "match what was served); detail names the field and the fix",
    429: "the caller's principal is over its rate limit; Retry-After gives the seconds until it may retry",
    503: "Kafka, Feast or the key store unavailable, or generation busy (Retry-After); nothing of the request was kept",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that can answer these problem statuses."""
    return {status: {"model": ProblemDetails, "description": PROBLEM_STATUS_TEXT[status]} for status in statuses}


DEMAND_SOURCE = (
    "followed from Kafka: the stream worker's demand agent's DesignDemand records on {demand_topic} (compacted, "
    "the latest per design), counted from the Order/Return events on {events_topic}; its ProductionOrder records "
    "are on {production_topic}"
)


class BackgroundTask(Protocol):
    """A follower the app starts with itself and stops on shutdown (model watcher, demand follower)."""

    def start(self) -> None: ...

    def stop(self, timeout_s: float = 5.0) -> None: ...


@runtime_checkable
class FollowsTopics(Protocol):
    """A background task that reads Kafka through topic followers, whose counts ``/metrics`` exports."""

    def topic_followers(self) -> list[TopicFollower]: ...


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
    keys: KeyStore | None = None,
    ledger: EventLedger | None = None,
    auth: AuthSettings | None = None,
    limits: RateLimitSettings | None = None,
    readiness: ReadinessSettings | None = None,
    prompt_check: PromptCheck | None = None,
) -> FastAPI:
    """The service's app; ``background`` tasks are started and stopped with the app's lifespan, and candidate
    generation runs on a pool of ``generation`` (default :class:`GenerationPoolSettings`).

    ``auth`` defaults to :meth:`AuthSettings.from_env`, ``keys`` to the key store those settings name (``keys.json``
    beside the designs' store: ``<state>/service/keys.json`` by default, where ``perfusion keys create`` writes),
    and ``ledger`` to the ledger in the designs' store (one database, shared by the service's replicas).
    ``limits`` and ``readiness`` default to their settings' defaults; ``prompt_check`` to the check of the
    generator's text encoder (its token limit)."""
    service_metrics = metrics if metrics is not None else ServiceMetrics()
    auth_settings = auth if auth is not None else AuthSettings.from_env()
    key_store = keys if keys is not None else KeyStore(auth_settings.resolved_keys_file(designs.path.parent))
    event_ledger = ledger if ledger is not None else EventLedger(designs.path)
    admission = EventAdmission(auth_settings, designs, event_ledger)
    pool = GenerationPool(generation)
    limiter = RateLimiter(limits)
    prompts = prompt_check if prompt_check is not None else _prompt_check_of(generator)
    ready = Readiness(
        {
            "kafka": reachability_check(
                event_sink, "event sink", "give the service a Kafka event sink (perfusion serve's KafkaEventSink)"
            ),
            "feast": reachability_check(
                feature_reader, "feature reader", "give the service a Feast reader (FeastFeatureReader)"
            ),
            "model": lambda _: _model_loaded(generator),
        },
        readiness,
    )
    following = [task for task in background if isinstance(task, FollowsTopics)]
    service_metrics.follow_counts_of(lambda: [follower for task in following for follower in task.topic_followers()])
    service_metrics.set_model_version(generator.model_version)
    started = time.monotonic()
    demand_source = DEMAND_SOURCE.format(
        demand_topic=TopicNames.of_topic(production_topic).design_demand,
        events_topic=events_topic,
        production_topic=production_topic,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for task in background:
            task.start()
        try:
            yield
        finally:
            for task in reversed(background):
                task.stop()
            ready.shutdown()

    app = FastAPI(
        title="PerFusion generator service",
        description="Personalized candidate groups for merchants' text designs, with events logged to Kafka. Every "
        "endpoint but /healthz, /readyz, /metrics and /problems needs an API key (`Authorization: Bearer <key>`).",
        lifespan=lifespan,
    )
    app.state.metrics = service_metrics
    app.state.keys = key_store
    # Added before the metrics middleware, which therefore wraps it and counts the 413s it answers.
    app.add_middleware(BodySizeLimit, limit_bytes=MAX_BODY_BYTES)
    install_metrics_middleware(app, service_metrics)
    install_error_handlers(app, service_metrics)

    def produce(event: DesignCreated | Impression | Click | Order | Return | Select) -> None:
        try:
            event_sink.send(event)
        except EventSinkUnavailable:
            service_metrics.kafka_errors.labels(operation="produce").inc()
            raise

    def merchant_of(design_id: str) -> str | None:
        return designs.get(design_id).merchant_id if designs.exists(design_id) else None

    def rate_limited(endpoint_class: EndpointClass) -> Any:
        """A dependency that takes a token of the caller's ``endpoint_class`` bucket, or refuses with 429."""

        async def admit(principal: Caller) -> Principal:
            try:
                limiter.admit(principal, endpoint_class)
            except Refusal:
                service_metrics.rate_limited.labels(endpoint_class=endpoint_class).inc()
                raise
            return principal

        return Depends(admit)

    def own_design(principal: Principal, design_id: str) -> Design:
        design = designs.get(design_id)
        require_own_design(principal, design)
        return design

    @app.post(
        "/designs",
        response_model=DesignCreatedResponse,
        status_code=201,
        responses=problem_responses(401, 403, 413, 422, 503),
    )
    def create_design(
        body: CreateDesign, principal: Caller, request: Request, response: Response
    ) -> DesignCreatedResponse:
        require(principal, "create_design")
        merchant_id = acting_for(principal, body.merchant_id, "merchant_id")
        prompts.require_drawable(body.prompt)
        design = designs.create(merchant_id, body.prompt, body.order_threshold)
        event = DesignCreated(
            event_id=f"evt-{uuid.uuid4().hex}",
            ts=design.created_ts,
            user_id=merchant_id,
            design_id=design.design_id,
            prompt=design.prompt,
            order_threshold=design.order_threshold,
        )
        event_ledger.record_design_created(event)
        try:
            produce(event)
        except EventSinkUnavailable:
            designs.delete(design.design_id)  # no design exists that the topics never heard of
            event_ledger.withdraw(event.event_id)
            raise
        response.headers["Location"] = str(request.url_for("design_status", design_id=design.design_id))
        return DesignCreatedResponse(
            design_id=design.design_id,
            merchant_id=design.merchant_id,
            prompt=design.prompt,
            order_threshold=design.order_threshold,
        )

    @app.get("/designs", response_model=DesignList, responses=problem_responses(401, 403, 422, 503))
    def list_designs(
        principal: Caller,
        merchant_id: Annotated[str | None, Query(min_length=1, max_length=MAX_ID_CHARS)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_DESIGNS_PAGE, description="designs per page")] = MAX_DESIGNS_PAGE,
        cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
    ) -> DesignList:
        require(principal, "list_designs")
        # A merchant lists their own; an operator every design, or one merchant's.
        owner = acting_for(principal, merchant_id, "merchant_id") if principal.role == "merchant" else merchant_id
        page = designs.designs_of(owner, after=decode_cursor(cursor), limit=limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return DesignList(
            designs=[
                DesignSummary(
                    design_id=design.design_id,
                    merchant_id=design.merchant_id,
                    prompt=design.prompt,
                    order_threshold=design.order_threshold,
                    created_ts=design.created_ts,
                )
                for design in page
            ],
            next_cursor=encode_cursor(page[-1].created_ts, page[-1].design_id) if more else None,
        )

    @app.get(
        "/designs/{design_id}",
        response_model=DesignStatusResponse,
        responses=problem_responses(401, 403, 404, 422, 503),
    )
    def design_status(design_id: IdPath, principal: Caller) -> DesignStatusResponse:
        require(principal, "read_design")
        own_design(principal, design_id)
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

    def candidates_access(principal: Principal, design_id: str, body: CandidatesRequest) -> tuple[Design, str]:
        """The design and the viewer a candidates request is for, or a refusal."""
        require(principal, "request_candidates")
        viewer = acting_for(principal, body.user_id, "user_id")
        design = designs.get(design_id)
        if principal.role == "merchant":  # reviews their own designs; shoppers see every design
            require_own_design(principal, design)
        prompts.require_design_drawable(design.design_id, design.prompt)
        return design, viewer

    def generate_impression(
        design: Design, viewer: str, body: CandidatesRequest
    ) -> tuple[Impression, Personalization, int, GeneratedGroup]:
        """The blocking part of a candidates request, run on the generation pool: read the viewer's features,
        generate, store the images, keep the impression in the ledger and produce it. Returns it with the
        personalization, the seed and the generated group (how it was drawn)."""
        read_started = time.perf_counter()
        try:
            features = feature_reader.read(viewer)
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
            user_id=viewer,
            design_id=design.design_id,
            prompt=design.prompt,
            model_version=group.model_version,
            candidates=[
                Candidate(image_id=image_id, position=position, descriptor=descriptor)
                for position, (image_id, descriptor) in enumerate(zip(image_ids, group.descriptors, strict=True))
            ],
        )
        event_ledger.record_impression(impression)
        try:
            produce(impression)
        except EventSinkUnavailable:
            event_ledger.withdraw(impression.event_id)  # no click can name an impression Kafka never heard of
            raise
        service_metrics.candidates.labels(personalization=personalization).inc(body.k)
        return impression, personalization, seed, group

    @app.post(
        "/designs/{design_id}/candidates",
        response_model=CandidatesResponse,
        dependencies=[rate_limited("generation")],
        responses=problem_responses(401, 403, 404, 413, 422, 429, 503),
    )
    async def candidates(
        design_id: IdPath, body: CandidatesRequest, request: Request, principal: Caller
    ) -> CandidatesResponse:
        # Checked off the event loop and before the generation pool, so refusals never take a generation slot.
        design, viewer = await run_in_threadpool(candidates_access, principal, design_id, body)
        impression, personalization, seed, group = await pool.run(lambda: generate_impression(design, viewer, body))
        return CandidatesResponse(
            impression_id=impression.event_id,
            design_id=impression.design_id,
            user_id=impression.user_id,
            model_version=impression.model_version,
            personalization=personalization,
            seed=seed,
            drawn=group.drawn,
            ranked_by=group.ranked_by,
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

    @app.get(
        "/images/{image_id}",
        name="image",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **problem_responses(401, 403, 404, 422, 503)},
    )
    def image(image_id: IdPath, principal: Caller) -> Response:
        require(principal, "read_image")
        if principal.role != "operator":
            served = event_ledger.impressions_of_image(image_id)
            if not served:
                raise UnknownImage(
                    f"image_id: no image {image_id!r} was served by this service; use a url of a candidates response"
                )
            require_image_access(principal, image_id, served, merchant_of)
        # An image id names one generated image forever; private: only callers allowed to see it get it.
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}
        return Response(content=images.png_bytes(image_id), media_type="image/png", headers=headers)

    def admit_and_produce(principal: Principal, raw: bytes) -> Click | Order | Return | Select:
        event = admission.admit(principal, raw)  # kept in the ledger from here on
        try:
            produce(event)
        except EventSinkUnavailable:
            event_ledger.withdraw(event.event_id)
            raise
        return event

    @app.post(
        "/events",
        response_model=EventAccepted,
        status_code=202,
        dependencies=[rate_limited("events")],
        responses=problem_responses(401, 403, 404, 409, 413, 422, 429, 503),
        # The body is read as bytes (checked, then parsed once); its schema is declared for clients.
        openapi_extra=posted_event_request_body(),
    )
    async def post_event(request: Request, principal: Caller) -> EventAccepted:
        raw = await request.body()  # at most MAX_BODY_BYTES: BodySizeLimit refused longer bodies while reading
        # The ledger's checks and kafka-python's wait for the broker's acknowledgement block: off the event loop.
        event = await run_in_threadpool(admit_and_produce, principal, raw)
        return EventAccepted(event_id=event.event_id, kind=event.kind, ts=event.ts, topic=events_topic)

    @app.get("/problems/{slug}", response_model=ProblemTypeDescription, responses=problem_responses(404, 422))
    async def problem_description(slug: IdPath) -> ProblemTypeDescription:
        if slug not in PROBLEM_TYPES:
            raise StarletteHTTPException(404, f"slug: no problem type {slug!r}; known: {', '.join(PROBLEM_TYPES)}")
        problem = PROBLEM_TYPES[slug]
        return ProblemTypeDescription(
            type=problem.uri, title=problem.title, status=problem.status, how_to_comply=problem.how_to_comply
        )

    # Both async: they run on the event loop itself, so no thread pool, however busy, can hold them up.
    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", model_version=generator.model_version, uptime_s=time.monotonic() - started)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        service_metrics.set_model_version(generator.model_version)
        service_metrics.generation_admitted.set(pool.admitted)
        return Response(content=service_metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # Async too, and its checks run on threads of their own: it waits neither on the generation pool nor on the
    # thread pool that the other endpoints share.
    @app.get(
        "/readyz",
        response_model=Ready,
        responses={503: {"model": ProblemDetails, "description": "a check failed; detail names it and the fix"}},
    )
    async def readyz() -> Ready | JSONResponse:
        outcomes = await ready.outcomes()
        failed = [outcome for outcome in outcomes if not outcome.ok]
        if not failed:
            return Ready(status="ready", checks=outcomes)
        response = problem_response(
            problem_type("not-ready"), "; ".join(f"{outcome.name}: {outcome.detail}" for outcome in failed)
        )
        return with_members(response, {"checks": [outcome.model_dump() for outcome in outcomes]})

    # The studio's and the storefront's pages; the checkout posts its orders through admit_and_produce, under the
    # caller's events limit.
    app.include_router(
        pages_router(
            designs=designs,
            ledger=event_ledger,
            post_event=admit_and_produce,
            events_topic=events_topic,
            checkout_dependencies=[rate_limited("events")],
            checkout_responses=problem_responses(401, 403, 404, 409, 413, 422, 429, 503),
            key_responses=problem_responses(401, 503),
            listing_responses=problem_responses(401, 403, 422, 503),
        )
    )
    _declare_event_schemas(app)
    return app


def _declare_event_schemas(app: FastAPI) -> None:
    """Add the posted event kinds' schemas (referenced by /events' request body) to the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(posted_event_schemas())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _prompt_check_of(generator: CandidateGenerator) -> PromptCheck:
    """The prompt check of the generator's text encoder, whose token limit it applies."""
    encoder = getattr(generator, "text_encoder", None)
    if not isinstance(encoder, CountsTokens):
        raise ConfigError(
            f"the generator {type(generator).__name__} has no text encoder that counts tokens (a TextEncoder); "
            "pass prompt_check=PromptCheck(<the text encoder it reads prompts with>)"
        )
    return PromptCheck(encoder)


def _model_loaded(generator: CandidateGenerator) -> str:
    version = generator.model_version
    if not version:
        raise ConfigError("the generator names no model version; restart the service with a base checkpoint")
    return f"serving model version {version}"
