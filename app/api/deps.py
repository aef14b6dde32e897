"""Dependencies shared by the routers: the runtime, readiness, and the optional API key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from app.problems import ProblemError
from app.runtime import Runtime

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required only when the service sets BONEAGE_API_KEY."
)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready:
        raise ProblemError(503, "The model is not loaded yet; retry shortly.", "Not ready", {"Retry-After": "2"})
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    if key is None or not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise ProblemError(401, "A valid X-API-Key header is required.", "Unauthorized", {"WWW-Authenticate": "APIKey"})
