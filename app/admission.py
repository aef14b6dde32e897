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

import json

from prometheus_client import Counter, Gauge
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import API_KEY_HEADER, UNAUTHORIZED, api_key_accepted
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
        self.key_header = API_KEY_HEADER.lower().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and not api_key_accepted(self.api_key, self._key(scope)):
            scope[REFUSED] = scope["path"]
            await self._answer(scope, send, 401, "Unauthorized", UNAUTHORIZED["detail"], UNAUTHORIZED["headers"])
            return
        if self.in_flight >= self.limit:
            scope[REFUSED] = scope["path"]
            self.refused.inc()
            detail = f"The service is at capacity ({self.limit} requests in progress); retry shortly."
            await self._answer(scope, send, 503, "Overloaded", detail, {"Retry-After": str(self.retry_after_s)})
            return
        self.in_flight += 1
        self.in_flight_gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.in_flight_gauge.dec()

    def _key(self, scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == self.key_header:
                return value.decode("latin-1")
        return None

    @staticmethod
    async def _answer(scope: Scope, send: Send, status: int, title: str, detail: str, extra: dict[str, str]) -> None:
        """A problem+json answer sent before the request's body is read."""
        state = scope.get("state") or {}
        body = json.dumps(
            {
                "type": "about:blank",
                "title": title,
                "status": status,
                "detail": detail,
                "instance": scope["path"],
                "request_id": state.get("request_id"),
            }
        ).encode()
        headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
