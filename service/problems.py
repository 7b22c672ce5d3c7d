"""Errors of the generator service's HTTP API as RFC 9457 problem details (``application/problem+json``).

Every refusal the service answers is a JSON object with

- ``type``: a URI naming the rule that refused the request, ``/problems/<slug>``; the service answers it
  (``GET /problems/<slug>``) with the rule's title, status and how to comply;
- ``title``: the rule in a few words, the same for every refusal of that type;
- ``status``: the HTTP status code;
- ``detail``: this refusal, one line that starts with the field when there is one and says the fix
  (``"event_id: 'evt-1' was used by an earlier event; send a new unique id or leave event_id out"``);
- ``field`` (an extension member, only when one field is at fault): that field's name.

The rules are :data:`PROBLEM_TYPES`; code refuses a request by raising :class:`Refusal` with one of them, and
``service.app`` turns it into the response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import JSONResponse

from perfusion.errors import PerfusionError

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_PATH = "/problems"


@dataclass(frozen=True)
class ProblemType:
    """One rule of the API: its slug (the last part of its type URI), status, title and how to comply."""

    slug: str
    status: int
    title: str
    how_to_comply: str

    @property
    def uri(self) -> str:
        return f"{PROBLEM_PATH}/{self.slug}"


def _types(*types: ProblemType) -> dict[str, ProblemType]:
    return {problem.slug: problem for problem in types}


PROBLEM_TYPES: Mapping[str, ProblemType] = _types(
    ProblemType(
        "missing-credentials",
        401,
        "API key required",
        "Send `Authorization: Bearer <key>` with a key from `perfusion keys create --role ROLE --principal ID`.",
    ),
    ProblemType(
        "invalid-key",
        401,
        "API key not valid",
        "The key is unknown, malformed or revoked; ask an operator for a new one (`perfusion keys create`).",
    ),
    ProblemType(
        "role-not-allowed",
        403,
        "Not allowed for this role",
        "Each action belongs to roles (merchant, shopper, order system, operator); send the key of a principal "
        "whose role may do it (README: who may do what).",
    ),
    ProblemType(
        "not-your-resource",
        403,
        "Someone else's resource",
        "A merchant acts on their own designs, a shopper on the impressions served to them; name your own.",
    ),
    ProblemType(
        "duplicate-event-id",
        409,
        "Event id already used",
        "Every event id is used once; send a new unique id, or leave event_id out and the service assigns one.",
    ),
    ProblemType(
        "timestamp-out-of-skew",
        422,
        "Event time too far from the service's clock",
        "Stamp events with the current time in seconds since the epoch (UTC), or leave ts out and the service "
        "stamps them.",
    ),
    ProblemType(
        "quantity-out-of-bounds",
        422,
        "Quantity out of bounds",
        "An order is of 1 to the service's maximum units; a return never exceeds what is left of its order.",
    ),
    ProblemType(
        "not-what-was-served",
        422,
        "Event does not match what the service served",
        "Name an impression returned by POST /designs/{id}/candidates to this user, its design and one of its "
        "candidates; a return names an order of the same shopper and that order's impression and image.",
    ),
    ProblemType(
        "prompt-not-drawable",
        422,
        "Prompt the model cannot draw",
        "Write the design with the words the model was trained on: one garment (t-shirt, dress, trousers, skirt, "
        "jacket, hoodie) and at most one colour, pattern, sleeve and fit, e.g. 'a red striped short-sleeve slim "
        "t-shirt'; the detail lists the words it does not know, or the prompt's tokens and the limit.",
    ),
    ProblemType("invalid-request", 422, "Request body not valid", "Fix the field the detail names."),
    ProblemType("invalid-event", 422, "Event not valid", "Fix the field the detail names."),
    ProblemType("not-found", 404, "Not found", "Use an id the service returned (POST /designs, candidates)."),
    ProblemType("bad-request", 400, "Bad request", "Fix the request as the detail says."),
    ProblemType(
        "method-not-allowed", 405, "Method not allowed", "Use a method the path offers (the Allow header lists them)."
    ),
    ProblemType("body-too-large", 413, "Request body too large", "Send one event or design per request."),
    ProblemType(
        "rate-limited",
        429,
        "Too many requests from this principal",
        "Wait the seconds Retry-After gives and send the request again; an operator may raise the limit the "
        "detail names (PERFUSION_SERVE_LIMITS__...).",
    ),
    ProblemType(
        "not-ready",
        503,
        "Service not ready",
        "A dependency of the service is not answering; the detail names each failed check (Kafka, Feast, the model) "
        "and its fix. GET /readyz again once it is fixed.",
    ),
    ProblemType(
        "unavailable",
        503,
        "Dependency unavailable",
        "Kafka, Feast or the generation pool could not serve the request; nothing of it was kept. Retry later.",
    ),
)


def problem_type(slug: str) -> ProblemType:
    return PROBLEM_TYPES[slug]


class Refusal(PerfusionError):
    """A request refused by one of :data:`PROBLEM_TYPES`; ``detail`` starts with ``field`` when one is at fault."""

    def __init__(
        self, slug: str, detail: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.problem = PROBLEM_TYPES[slug]
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return self.problem.status


def problem_response(
    problem: ProblemType,
    detail: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    status: int | None = None,
) -> JSONResponse:
    """The ``application/problem+json`` response of one refusal (``status`` overrides the type's own)."""
    code = problem.status if status is None else status
    content: dict[str, object] = {"type": problem.uri, "title": problem.title, "status": code, "detail": detail}
    if field is not None:
        content["field"] = field
    return JSONResponse(status_code=code, content=content, headers=dict(headers or {}), media_type=PROBLEM_CONTENT_TYPE)


def refusal_response(refusal: Refusal) -> JSONResponse:
    return problem_response(refusal.problem, refusal.detail, refusal.field, refusal.headers)
