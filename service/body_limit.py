"""A request body limit enforced while the body streams in, as pure ASGI middleware.

Reading a body whole and then measuring it lets every oversized request cost its full size in memory first (four
concurrent 50 MB posts raised the service's memory by about 250 MB). :class:`BodySizeLimit` refuses earlier:

- a declared ``Content-Length`` over the limit is answered 413 before any of the body is read;
- otherwise it counts the bytes of each ``http.request`` message as the app receives them, and the first message
  that takes the total over the limit raises :class:`RequestBodyTooLarge` (an HTTP 413) inside the app, so no more
  than the limit plus one message (uvicorn's messages are at most 64 KiB) is ever held. That covers chunked bodies
  and bodies longer than they declared.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# A longer Content-Length is over any limit; it is not converted, so a 5,000-digit header costs nothing.
_MAX_LENGTH_DIGITS = 18


class RequestBodyTooLarge(HTTPException):
    """HTTP 413: the request's body is over the service's limit."""

    def __init__(self, limit_bytes: int, seen_bytes: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"body: more than {limit_bytes} bytes (at least {seen_bytes} sent); "
            "send one event or design per request",
        )


class BodySizeLimit:
    """Refuses HTTP requests whose body is over ``limit_bytes`` with 413, without reading past the limit."""

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be at least 1, got {limit_bytes}")
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared == "invalid":
            await JSONResponse(status_code=400, content={"detail": "content-length: not a non-negative integer"})(
                scope, receive, send
            )
            return
        if isinstance(declared, int) and declared > self.limit_bytes:
            refusal = RequestBodyTooLarge(self.limit_bytes, declared)
            await JSONResponse(status_code=refusal.status_code, content={"detail": refusal.detail})(
                scope, receive, send
            )
            return

        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit_bytes:
                    raise RequestBodyTooLarge(self.limit_bytes, received)
            return message

        await self.app(scope, counted_receive, send)


def _declared_length(scope: Scope) -> int | str | None:
    """The Content-Length header as a number, None when absent, ``"invalid"`` when it is not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            # isdigit() also takes other scripts' digits that int() would read; a length is ASCII only.
            if not text or not all("0" <= character <= "9" for character in text):
                return "invalid"
            return int(text) if len(text) <= _MAX_LENGTH_DIGITS else 10**_MAX_LENGTH_DIGITS
    return None
