"""Admission control: refuse prediction requests at the door when the service is full.

Why here and not in the batcher: FastAPI reads and parses a request's body before any handler
or dependency runs, and the handler then decodes and preprocesses the image. If the only limit
were the batcher's queue, every request beyond capacity would still be uploaded into memory,
parsed and preprocessed before being refused, so under overload the CPU went to work that was
thrown away, refusals got slow, and the number of requests held in memory had no bound.

This pure ASGI middleware counts the prediction requests inside the service (being uploaded,
preprocessed, queued or predicted) and answers 503 with ``Retry-After`` before reading the body
of any request beyond ``limit``. Memory is then bounded by ``limit`` × the upload limit, and a
refusal costs microseconds. When the service requires an API key, a request without a valid one
is answered 401 here too, so it never holds a slot nor has its upload read.

The door also bounds each body: a request declaring more than the body limit in its
Content-Length is answered 413 before any of it is read, and the bytes of every body (chunked
uploads declare no length) are counted as they arrive, answering 413 as soon as the limit is
passed. Nothing beyond the limit is read into memory, and nothing is written to disk
(``app.main`` keeps multipart parts in memory up to the upload limit).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import API_KEY_HEADER, UNAUTHORIZED, api_key_accepted
from app.problems import problem

REFUSED = "boneage.refused"  # Scope key: set on a refused request, read by the logging middleware.


class BodyTooLarge(HTTPException):
    """Raised from the counting ``receive`` once a body passes its limit.

    An HTTPException, because FastAPI turns any other exception raised while it reads a body
    into a 400 "error parsing the body"; this one it passes on to the problem+json handler.
    """

    def __init__(self, limit: int):
        detail = f"The request body is more than {limit:,} bytes; the limit is {limit:,} bytes."
        super().__init__(413, detail, headers={"Connection": "close"})


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        paths: frozenset[str],
        limit: int,
        in_flight: Gauge,
        refused: Counter,
        api_key: SecretStr | None = None,
        retry_after_s: int = 1,
        max_body: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.paths = paths
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.in_flight_gauge = in_flight
        self.refused = refused
        self.api_key = api_key
        self.max_body = max_body or {}  # path → largest body in bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and not api_key_accepted(self.api_key, Headers(scope=scope).get(API_KEY_HEADER)):
            scope[REFUSED] = scope["path"]
            await self._answer(
                scope, receive, send, 401, "Unauthorized", UNAUTHORIZED["detail"], UNAUTHORIZED["headers"]
            )
            return
        if self.in_flight >= self.limit:
            scope[REFUSED] = scope["path"]
            self.refused.inc()
            detail = f"The service is at capacity ({self.limit} requests in progress); retry shortly."
            await self._answer(
                scope, receive, send, 503, "Overloaded", detail, {"Retry-After": str(self.retry_after_s)}
            )
            return
        limit = self.max_body.get(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, f"{int(declared):,} bytes", limit)
            return
        self.in_flight += 1
        self.in_flight_gauge.inc()
        received, started = 0, False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if limit is not None and received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:  # Read by something that does not answer HTTPExceptions itself.
            if started:
                raise
            await self._too_large(scope, receive, send, f"more than {limit:,} bytes", limit)
        finally:
            self.in_flight -= 1
            self.in_flight_gauge.dec()

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: str, limit: int) -> None:
        scope[REFUSED] = scope["path"]
        detail = f"The request body is {size}; the limit is {limit:,} bytes."
        await self._answer(scope, receive, send, 413, "Upload too large", detail, {"Connection": "close"})

    @staticmethod
    async def _answer(
        scope: Scope, receive: Receive, send: Send, status: int, title: str, detail: str, headers: dict[str, str]
    ) -> None:
        """The service's usual problem+json answer, sent before the request's body is read."""
        await problem(Request(scope, receive), status, title, detail, headers)(scope, receive, send)
