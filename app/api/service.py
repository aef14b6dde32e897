"""Liveness, readiness and Prometheus metrics: the operator's endpoints (never behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.schemas import Health

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
async def healthz(request: Request):
    """Liveness: the process is up and answering, and its batcher has not given up."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None and runtime.ready and not runtime.batcher.alive:
        return JSONResponse(
            Health(status="not ready", detail="the batcher has stopped after repeated failures").model_dump(),
            status_code=503,
        )
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
async def readyz(request: Request):
    """Readiness: the model is loaded and warmed up (its first call, and its largest batch)."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready:
        return JSONResponse(
            Health(status="not ready", detail="model loading or shutting down").model_dump(), status_code=503
        )
    if not runtime.batcher.alive:
        return JSONResponse(
            Health(status="not ready", detail="the batcher has stopped after repeated failures").model_dump(),
            status_code=503,
        )
    return Health(status="ready")


@router.get("/metrics", tags=["operations"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by status, latency, in flight and refused, batch sizes, queue depth and wait."""
    m = request.app.state.metrics
    runtime = getattr(request.app.state, "runtime", None)
    m.queue_depth.set(runtime.batcher.depth if runtime else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
