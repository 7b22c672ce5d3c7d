"""Request and response bodies of the generator service's HTTP API.

Requests forbid unknown fields, so a misspelt field is an error that names it rather than a silently ignored value,
and are strict about types, so ``true`` is not a number.
Limits match the Kafka records they become (``perfusion.contracts.records``): prompts of 1..300 characters, ids of
1..128, K of 1..16. Who is calling comes from the API key, not the body: a merchant's or shopper's own id may be
left out of a body, and naming someone else is refused (``service.access``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from perfusion.contracts.records import MAX_K

MAX_PROMPT_CHARS = 300
MAX_ID_CHARS = 128

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Personalization = Literal["personalized", "cold_start", "base"]


class RequestBody(BaseModel):
    # strict: a JSON boolean is not a number (Python's True == 1 would make ``"k": true`` a K of 1), nor a string
    # a number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CreateDesign(RequestBody):
    merchant_id: Identifier | None = Field(
        default=None,
        description="the merchant who owns the design: the caller's own id when a merchant calls (may be left out); "
        "an operator names it",
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the text design, e.g. 'a red dress'")
    order_threshold: int = Field(ge=1, le=1_000_000, description="net orders at which production starts")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_words(cls, prompt: str) -> str:
        stripped = " ".join(prompt.split())
        if not stripped:
            raise ValueError("prompt must contain words, not only whitespace; describe the item, e.g. 'a red dress'")
        return stripped


class DesignCreatedResponse(BaseModel):
    design_id: str
    merchant_id: str
    prompt: str
    order_threshold: int


class DesignSummary(DesignCreatedResponse):
    created_ts: float


class DesignList(BaseModel):
    designs: list[DesignSummary] = Field(description="oldest first: a merchant's own, or every design for an operator")
    next_cursor: str | None = Field(
        default=None, description="pass as ?cursor= for the next page; null: this page is the last"
    )


class CandidatesRequest(RequestBody):
    user_id: Identifier | None = Field(
        default=None,
        description="the viewer, whose Feast features personalize the group: a shopper's or merchant's own id "
        "(left out: the caller), any user when an operator previews",
    )
    k: int = Field(default=4, ge=1, le=MAX_K, description=f"number of candidate images, 1..{MAX_K}")
    seed: int | None = Field(
        default=None, ge=0, lt=2**63, description="noise seed; the same seed, user and version give the same images"
    )


class CandidateOut(BaseModel):
    image_id: str
    url: str
    position: int
    descriptor: list[float]


class CandidatesResponse(BaseModel):
    impression_id: str
    design_id: str
    user_id: str
    model_version: str
    personalization: Personalization = Field(
        description="personalized (preference features), cold_start (profile features only) or base (no features)"
    )
    seed: int
    drawn: int | None = Field(
        default=None,
        description="candidates sampled to show these: N when best-of-N ranked them, K when not (null: not said)",
    )
    ranked_by: str | None = Field(
        default=None, description="the model version whose reward model chose and ordered them; null: shown as drawn"
    )
    candidates: list[CandidateOut]


class EventAccepted(BaseModel):
    event_id: str = Field(description="the event's id as posted, or the one the service assigned")
    kind: str
    ts: float = Field(description="event time as posted, or the service's clock when it was left out")
    topic: str


class DesignStatusResponse(BaseModel):
    design_id: str
    merchant_id: str
    prompt: str
    order_threshold: int
    net_orders: int
    production_triggered: bool
    production_ts: float | None
    demand_source: str = Field(description="where net_orders and production_triggered come from")


class Health(BaseModel):
    status: Literal["ok"]
    model_version: str
    uptime_s: float


class ProblemDetails(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``; see ``service.problems``)."""

    type: str = Field(description="the rule that refused the request, /problems/<slug>; GET it for how to comply")
    title: str
    status: int
    detail: str = Field(description="this refusal: the field at fault first, and the fix")
    field: str | None = Field(default=None, description="the field at fault, when there is one")


class ProblemTypeDescription(BaseModel):
    type: str
    title: str
    status: int
    how_to_comply: str
