"""Dependencies shared by the routers: the runtime, readiness, and the optional API key."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from pydantic import SecretStr

from app.problems import ProblemError
from app.runtime import Runtime

API_KEY_HEADER = "X-API-Key"
UNAUTHORIZED = {"detail": "A valid X-API-Key header is required.", "headers": {"WWW-Authenticate": "APIKey"}}
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="Required only when the service sets BONEAGE_API_KEY."
)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready:
        raise ProblemError(503, "The model is not loaded yet; retry shortly.", "Not ready", {"Retry-After": "2"})
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def api_key_accepted(expected: SecretStr | None, key: str | None) -> bool:
    """True when no key is configured or ``key`` matches it (also used by admission control)."""
    if expected is None:
        return True
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    return key is not None and hmac.compare_digest(key.encode(), expected.get_secret_value().encode())


def require_api_key(request: Request, key: Annotated[str | None, Security(_api_key_header)] = None) -> None:
    if not api_key_accepted(request.app.state.settings.api_key, key):
        raise ProblemError(401, UNAUTHORIZED["detail"], "Unauthorized", UNAUTHORIZED["headers"])
