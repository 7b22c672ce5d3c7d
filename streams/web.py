"""The worker's HTTP endpoints, served by Faust's web server on the worker's event loop when ``http_port`` is set:

- ``GET /healthz``: 200 while the process runs. The answer comes from the event loop that runs the agents, so a
  loop blocked by one long call does not answer at all (a probe's timeout is the signal);
- ``GET /readyz``: 200 once the consumer runs and owns partitions, with no rebalance or table recovery under way;
  503 otherwise, with what is missing. A worker in a group with more workers than partitions stays unready;
- ``GET /metrics``: the worker's metrics (:mod:`streams.metrics`) in Prometheus's text format; ``?name[]=<sample>``
  (repeatable) renders only those samples.

Faust imports its web views at module level: import this module only where Faust may be imported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from faust.web import Request, Response, View

from streams.metrics import METRICS_CONTENT_TYPE, WorkerMetrics

if TYPE_CHECKING:
    import faust

HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"


@dataclass(frozen=True)
class Readiness:
    """Whether the worker takes its share of the work now, and what it is waiting for when not."""

    consumer_state: str
    assigned_partitions: int
    rebalancing: bool
    recovering: bool

    @property
    def waiting_for(self) -> list[str]:
        missing = []
        if self.consumer_state != "running":
            missing.append(f"the consumer to run (it is {self.consumer_state})")
        if self.assigned_partitions == 0:
            missing.append("partitions to be assigned")
        if self.rebalancing:
            missing.append("the rebalance to end")
        if self.recovering:
            missing.append("the tables' recovery to end")
        return missing

    @property
    def ready(self) -> bool:
        return not self.waiting_for

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "waiting_for": self.waiting_for,
            "consumer_state": self.consumer_state,
            "assigned_partitions": self.assigned_partitions,
            "rebalancing": self.rebalancing,
            "recovering": self.recovering,
        }


def readiness_of(app: faust.App) -> Readiness:
    consumer = app.consumer
    return Readiness(
        consumer_state=consumer.state,
        assigned_partitions=len(consumer.assignment()),
        rebalancing=bool(app.rebalancing),
        # Set by Faust's table recovery while it replays changelogs (not declared on the App class).
        recovering=bool(getattr(app, "in_recovery", False)),
    )


def register_pages(app: faust.App, metrics: WorkerMetrics) -> None:
    """Declare ``/healthz``, ``/readyz`` and ``/metrics`` on ``app``'s web server."""
    started = time.monotonic()

    @app.page(HEALTH_PATH, name="healthz")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok", "uptime_s": round(time.monotonic() - started, 1)})

    @app.page(READY_PATH, name="readyz")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            readiness = readiness_of(self.app)  # type: ignore[arg-type]
            return self.json(readiness.as_dict(), status=200 if readiness.ready else 503)

    @app.page(METRICS_PATH, name="metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            # aiohttp refuses a content type with a charset as an argument; as a header it passes unchanged.
            names = [value for key, value in request.query.items() if key == "name[]"]  # a multidict: every pair
            return self.bytes(metrics.render(names), headers={"Content-Type": METRICS_CONTENT_TYPE})
