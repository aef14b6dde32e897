"""Admission control: refuse prediction requests at the door when the service is full.

Why here and not in the batcher: FastAPI reads and parses a request's body before any handler
or dependency runs, and the handler then decodes and preprocesses the image. If the only limit
were the batcher's queue, every request beyond capacity would still be uploaded into memory,
parsed and preprocessed before being refused, so under overload the CPU went to work that was
thrown away, refusals got slow, and the number of requests held in memory had no bound.

This pure ASGI middleware counts the prediction requests inside the service (being uploaded,
preprocessed, queued or predicted) and answers 503 with ``Retry-After`` before reading the body
of any request beyond ``limit``. Memory is then bounded by ``limit`` × the upload limit, and a
refusal costs microseconds.
"""

from __future__ import annotations

import json

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from app.problems import PROBLEM_JSON

REFUSED = "boneage.refused"  # Scope key: set on a refused request, read by the logging middleware.


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        paths: frozenset[str],
        limit: int,
        in_flight: Gauge,
        refused: Counter,
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.paths = paths
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.in_flight_gauge = in_flight
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            scope[REFUSED] = scope["path"]
            self.refused.inc()
            await self._refuse(scope, send)
            return
        self.in_flight += 1
        self.in_flight_gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.in_flight_gauge.dec()

    async def _refuse(self, scope: Scope, send: Send) -> None:
        state = scope.get("state") or {}
        body = json.dumps(
            {
                "type": "about:blank",
                "title": "Overloaded",
                "status": 503,
                "detail": f"The service is at capacity ({self.limit} requests in progress); retry shortly.",
                "instance": scope["path"],
                "request_id": state.get("request_id"),
            }
        ).encode()
        headers = [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.retry_after_s).encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
