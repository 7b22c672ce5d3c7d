"""A typed client of the generator service's HTTP API: what merchants, shoppers and the order system of the demo call.

Each client sends one principal's API key (``Authorization: Bearer``); :meth:`ServiceClient.with_key` gives another
principal's client on the same connection pool. Responses are parsed into the service's own response models
(``service.schemas``); events are the Kafka records of ``perfusion.contracts.records`` posted as JSON. A non-2xx
answer raises :class:`ServiceRequestFailed` with the status, the problem type and the service's ``detail``.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

import httpx
import numpy as np
from numpy.typing import NDArray

from perfusion.errors import InfrastructureError
from service.schemas import CandidatesResponse, DesignCreatedResponse, DesignStatusResponse, EventAccepted, Health

if TYPE_CHECKING:
    from perfusion.contracts.records import Click, Order, Return, Select

_HISTOGRAM_SUM = re.compile(r"^(?P<name>[a-z_]+)_(?P<part>sum|count)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


class ServiceRequestFailed(InfrastructureError):
    """The service answered an error (or could not be reached)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ServiceClient:
    """Requests to ``base_url`` (e.g. ``http://127.0.0.1:8000``) with ``api_key`` when given, on a connection pool
    of its own or on ``pool`` (another client's, which stays open when this one closes)."""

    def __init__(
        self, base_url: str, timeout_s: float = 120.0, api_key: str | None = None, pool: httpx.Client | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_pool = pool is None
        self._http = pool if pool is not None else httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}

    def with_key(self, api_key: str | None) -> ServiceClient:
        """The client of another principal (None: of nobody, without credentials), on this client's connection pool."""
        return ServiceClient(self.base_url, api_key=api_key, pool=self._http)

    def close(self) -> None:
        if self._owns_pool:
            self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: object
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method,
                path,
                headers={**self._headers, **(headers or {})},
                **kwargs,  # type: ignore[arg-type]
            )
        except httpx.HTTPError as exc:
            raise ServiceRequestFailed(
                f"{method} {self.base_url}{path} failed ({type(exc).__name__}: {exc}); is `perfusion serve` running?"
            ) from exc
        if response.status_code >= 400:
            try:
                problem = response.json()
                detail = f"{problem.get('detail', response.text)} [{problem.get('type', 'no type')}]"
            except (ValueError, AttributeError):
                detail = response.text
            raise ServiceRequestFailed(
                f"{method} {path} answered {response.status_code}: {detail}", status_code=response.status_code
            )
        return response

    def healthz(self) -> Health:
        return Health.model_validate_json(self._request("GET", "/healthz").content)

    def is_up(self) -> bool:
        try:
            self.healthz()
        except ServiceRequestFailed:
            return False
        return True

    def create_design(self, prompt: str, order_threshold: int, merchant_id: str | None = None) -> DesignCreatedResponse:
        """A design of this client's merchant (an operator's client names ``merchant_id``)."""
        body: dict[str, object] = {"prompt": prompt, "order_threshold": order_threshold}
        if merchant_id is not None:
            body["merchant_id"] = merchant_id
        return DesignCreatedResponse.model_validate_json(self._request("POST", "/designs", json=body).content)

    def candidates(
        self, design_id: str, k: int, seed: int | None = None, user_id: str | None = None
    ) -> CandidatesResponse:
        """A group for this client's principal (an operator's client names the viewer, ``user_id``)."""
        body: dict[str, object] = {"k": k}
        if user_id is not None:
            body["user_id"] = user_id
        if seed is not None:
            body["seed"] = seed
        response = self._request("POST", f"/designs/{design_id}/candidates", json=body)
        return CandidatesResponse.model_validate_json(response.content)

    def image(self, image_id: str) -> NDArray[np.uint8]:
        """The PNG of one generated image as [H, W, 3] uint8 pixels."""
        from PIL import Image

        png = self._request("GET", f"/images/{image_id}").content
        with Image.open(io.BytesIO(png)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def post_event(self, event: Click | Order | Return | Select) -> EventAccepted:
        response = self._request(
            "POST", "/events", content=event.to_bytes(), headers={"content-type": "application/json"}
        )
        return EventAccepted.model_validate_json(response.content)

    def design(self, design_id: str) -> DesignStatusResponse:
        return DesignStatusResponse.model_validate_json(self._request("GET", f"/designs/{design_id}").content)

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics").text


def histogram_mean(metrics_text: str, name: str) -> tuple[float, int]:
    """(mean seconds, count) of a Prometheus histogram in ``metrics_text``, summed over its label sets."""
    sums = counts = 0.0
    for line in metrics_text.splitlines():
        match = _HISTOGRAM_SUM.match(line)
        if match is None or match["name"] != name:
            continue
        if match["part"] == "sum":
            sums += float(match["value"])
        else:
            counts += float(match["value"])
    return (sums / counts if counts else float("nan")), int(counts)
