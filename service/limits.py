"""Rate limits per principal: a token bucket for each authenticated caller and each class of endpoint.

Two classes of requests cost the service something a client could push without bound:

- ``generation``: ``POST /designs/{id}/candidates``, a group of images drawn on the CPU;
- ``events``: ``POST /events`` and the storefront's ``POST /shop/checkout``, each a check against the ledger and a
  produce that waits for Kafka's acknowledgement.

Each (principal, class) has a bucket of ``<class>_burst`` tokens that refills at ``<class>_per_minute``; a request
takes one token, and a request that finds none is refused with 429 (``rate-limited`` problem details) and a
``Retry-After`` of the whole seconds until the next token, before anything of it runs, so nothing refused reaches
Kafka. The bucket is keyed by the key's principal, not by the key: a principal with several keys shares one budget.

The shop's order system and operators are trusted services whose traffic is the whole shop's (every shopper's
orders, a benchmark's requests), so they are not limited unless ``include_trusted_roles`` is set. The bound on the
CPU as a whole is the generation pool's (:mod:`service.generation_pool`); these limits keep one client from taking
all of it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, get_args

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from perfusion.settings import Settings
from service.auth import Principal, Role
from service.problems import Refusal

EndpointClass = Literal["generation", "events"]
ENDPOINT_CLASSES: Final[tuple[EndpointClass, ...]] = get_args(EndpointClass)
TRUSTED_ROLES: Final[tuple[Role, ...]] = ("order_system", "operator")
SETTINGS_VARIABLE_PREFIX: Final = "PERFUSION_SERVE_LIMITS__"
ENDPOINTS_OF: Final[dict[EndpointClass, str]] = {
    "generation": "POST /designs/{id}/candidates",
    "events": "POST /events and POST /shop/checkout",
}


class RateLimitSettings(Settings):
    """How often one principal may generate and post events (``PERFUSION_SERVE_LIMITS__<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix=SETTINGS_VARIABLE_PREFIX)

    generation_per_minute: float = Field(
        default=60.0,
        gt=0.0,
        le=60_000.0,
        description="candidate groups one principal may request per minute, on average (POST /designs/{id}/candidates)",
    )
    generation_burst: int = Field(
        default=30,
        ge=1,
        le=10_000,
        description="candidate requests one principal may make at once before the per-minute rate applies (the "
        "storefront draws every design on sale, up to 24, when it opens)",
    )
    events_per_minute: float = Field(
        default=600.0,
        gt=0.0,
        le=600_000.0,
        description="events one principal may post per minute, on average (POST /events, POST /shop/checkout)",
    )
    events_burst: int = Field(
        default=120, ge=1, le=100_000, description="events one principal may post at once before the rate applies"
    )
    include_trusted_roles: bool = Field(
        default=False,
        description="limit the order system and operators too (off: trusted services, whose traffic is the shop's)",
    )

    def per_minute(self, endpoint_class: EndpointClass) -> float:
        return self.generation_per_minute if endpoint_class == "generation" else self.events_per_minute

    def burst(self, endpoint_class: EndpointClass) -> int:
        return self.generation_burst if endpoint_class == "generation" else self.events_burst


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets per (principal, endpoint class); thread-safe. ``clock`` is seconds, monotonic."""

    def __init__(self, settings: RateLimitSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings if settings is not None else RateLimitSettings()
        self.clock = clock
        self._lock = threading.Lock()
        # Keyed by authenticated principals only, so the table is as large as the key store's principals.
        self._buckets: dict[tuple[Role, str, EndpointClass], _Bucket] = {}

    def limits(self, principal: Principal) -> bool:
        return self.settings.include_trusted_roles or principal.role not in TRUSTED_ROLES

    def seconds_until_allowed(self, principal: Principal, endpoint_class: EndpointClass) -> float:
        """Take a token of ``principal``'s bucket and answer 0.0, or answer the seconds until one is there (nothing
        taken)."""
        if not self.limits(principal):
            return 0.0
        burst = float(self.settings.burst(endpoint_class))
        per_second = self.settings.per_minute(endpoint_class) / 60.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.setdefault((principal.role, principal.id, endpoint_class), _Bucket(burst, now))
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / per_second

    def admit(self, principal: Principal, endpoint_class: EndpointClass) -> None:
        """Take a token for this request, or refuse it with 429 ``rate-limited`` and ``Retry-After``."""
        wait_s = self.seconds_until_allowed(principal, endpoint_class)
        if wait_s <= 0.0:
            return
        retry_after_s = max(1, math.ceil(wait_s))
        per_minute = self.settings.per_minute(endpoint_class)
        variable = f"{SETTINGS_VARIABLE_PREFIX}{endpoint_class.upper()}_PER_MINUTE"
        raise Refusal(
            "rate-limited",
            f"Authorization: {principal.describe()} is over the {endpoint_class} limit of {per_minute:g} requests "
            f"per minute (bursts of {self.settings.burst(endpoint_class)}) for {ENDPOINTS_OF[endpoint_class]}; "
            f"retry in {retry_after_s} s, or an operator raises {variable} "
            f"(and {SETTINGS_VARIABLE_PREFIX}{endpoint_class.upper()}_BURST)",
            field="Authorization",
            headers={"Retry-After": str(retry_after_s)},
        )
