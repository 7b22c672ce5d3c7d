"""A typed Python client of the generator service: the server's own request and response models
(:mod:`service.schemas`), the API key on every call, and every refusal raised as :class:`ServiceProblem` with the
problem details the service answered (RFC 9457: the rule, the field at fault, the fix, and ``Retry-After``).

    with PerfusionClient("http://127.0.0.1:8000", api_key) as client:
        design = client.create_design("a red striped t-shirt", order_threshold=5)
        group = client.candidates(design.design_id, k=4)
        client.post_event({"kind": "click", "impression_id": group.impression_id, ...})

The README's "Calling the service" shows the same calls with curl.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.schemas import (
    CandidatesRequest,
    CandidatesResponse,
    CreateDesign,
    DesignCreatedResponse,
    DesignList,
    DesignStatusResponse,
    EventAccepted,
    ProblemDetails,
)

ModelT = TypeVar("ModelT", bound=BaseModel)


class ServiceProblem(Exception):
    """The service refused a request: its status and problem details, and how long to wait when it says."""

    def __init__(self, status: int, problem: ProblemDetails | None, body: str, retry_after_s: float | None) -> None:
        self.status = status
        self.problem = problem
        self.retry_after_s = retry_after_s
        super().__init__(f"{status}: {problem.detail if problem is not None else body[:200]}")


class PerfusionClient:
    """Calls of one principal (``api_key``) to the service at ``base_url``; ``http`` replaces the HTTP client
    (a FastAPI TestClient in tests, or one with its own transport settings)."""

    def __init__(self, base_url: str, api_key: str, http: httpx.Client | None = None, timeout_s: float = 60.0) -> None:
        self.http = http if http is not None else httpx.Client(base_url=base_url, timeout=timeout_s)
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def __enter__(self) -> PerfusionClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def create_design(self, prompt: str, order_threshold: int, merchant_id: str | None = None) -> DesignCreatedResponse:
        """A new design of the caller (an operator names ``merchant_id``)."""
        body = CreateDesign(prompt=prompt, order_threshold=order_threshold, merchant_id=merchant_id)
        return self._call("POST", "/designs", DesignCreatedResponse, json=body.model_dump(exclude_none=True))

    def designs(self, merchant_id: str | None = None) -> DesignList:
        """The caller's designs (an operator: every design, or ``merchant_id``'s)."""
        params = {"merchant_id": merchant_id} if merchant_id is not None else None
        return self._call("GET", "/designs", DesignList, params=params)

    def design(self, design_id: str) -> DesignStatusResponse:
        """A design's net orders against its threshold and whether production was triggered."""
        return self._call("GET", f"/designs/{design_id}", DesignStatusResponse)

    def candidates(
        self, design_id: str, k: int = 4, user_id: str | None = None, seed: int | None = None
    ) -> CandidatesResponse:
        """K candidates of the design drawn for the viewer (the caller, or ``user_id`` where the caller may)."""
        body = CandidatesRequest(user_id=user_id, k=k, seed=seed)
        path = f"/designs/{design_id}/candidates"
        return self._call("POST", path, CandidatesResponse, json=body.model_dump(exclude_none=True))

    def image(self, image_id: str) -> bytes:
        """A candidate's PNG."""
        response = self.http.get(f"/images/{image_id}", headers=self.headers)
        self._raise_for_problem(response)
        return response.content

    def post_event(self, event: dict[str, Any] | BaseModel) -> EventAccepted:
        """A click, selection, order or return (orders and returns: the order system's key)."""
        body = event.model_dump(mode="json") if isinstance(event, BaseModel) else event
        return self._call("POST", "/events", EventAccepted, json=body)

    def _call(self, method: str, path: str, model: type[ModelT], **kwargs: Any) -> ModelT:
        response = self.http.request(method, path, headers=self.headers, **kwargs)
        self._raise_for_problem(response)
        return model.model_validate(response.json())

    @staticmethod
    def _raise_for_problem(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            problem: ProblemDetails | None = ProblemDetails.model_validate(response.json())
        except ValueError:
            problem = None
        retry_after = response.headers.get("retry-after")
        raise ServiceProblem(
            response.status_code, problem, response.text, float(retry_after) if retry_after is not None else None
        )
