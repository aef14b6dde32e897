"""A closed-loop load generator: C clients, each sending its next request when the last one returns."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


def encoded(uploads: list[tuple[str, bytes, str]]) -> list[tuple[bytes, dict[str, str]]]:
    """Encode each multipart form once (body, headers): the load generator shares the server's
    two cores, so it should spend them sending, not re-encoding the same upload."""
    forms = []
    for name, data, sex in uploads:
        request = httpx.Request("POST", "http://x/v1/bone-age", files={"image": (name, data)}, data={"sex": sex})
        forms.append((request.read(), {"content-type": request.headers["content-type"]}))
    return forms


async def _closed_loop(
    url: str, uploads: list[tuple[str, bytes, str]], concurrency: int, duration: float, max_requests: int | None
) -> LoadResult:
    result = LoadResult(concurrency, 0.0)
    cycle = itertools.cycle(encoded(uploads))
    sent = 0
    # Expire idle connections before uvicorn's 5 s keep-alive does (no reuse of a closed connection).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop = time.monotonic() + duration

        async def client_loop() -> None:
            nonlocal sent
            while time.monotonic() < stop and (max_requests is None or sent < max_requests):
                sent += 1
                body, headers = next(cycle)
                started = time.monotonic()
                try:
                    r = await client.post("/v1/bone-age", content=body, headers=headers)
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0  # Connection-level failure: counted as an error.
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.latencies.append(time.monotonic() - started)

        began = time.monotonic()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        result.seconds = time.monotonic() - began
    return result


def closed_loop(
    url: str, uploads: list[tuple[str, bytes, str]], concurrency: int, duration: float, max_requests: int | None = None
) -> LoadResult:
    """Run C clients for ``duration`` seconds (or ``max_requests`` in all) against POST /v1/bone-age."""
    return asyncio.run(_closed_loop(url, uploads, concurrency, duration, max_requests))
