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
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import API_KEY_HEADER, UNAUTHORIZED, api_key_accepted
from app.problems import problem

REFUSED = "boneage.refused"  # Scope key: set on a refused request, read by the logging middleware.


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
    ) -> None:
        self.app = app
        self.paths = paths
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.in_flight_gauge = in_flight
        self.refused = refused
        self.api_key = api_key

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
        self.in_flight += 1
        self.in_flight_gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.in_flight_gauge.dec()

    @staticmethod
    async def _answer(
        scope: Scope, receive: Receive, send: Send, status: int, title: str, detail: str, headers: dict[str, str]
    ) -> None:
        """The service's usual problem+json answer, sent before the request's body is read."""
        await problem(Request(scope, receive), status, title, detail, headers)(scope, receive, send)
