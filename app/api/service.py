"""Model information, liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import RuntimeDep, require_api_key
from app.schemas import BatchingInfo, Health, ModelInfo

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=[Depends(require_api_key)])
async def model_info(runtime: RuntimeDep) -> ModelInfo:
    """The served model: metadata from its file, input size, execution providers and batching."""
    s, f = runtime.settings, runtime.model.file
    return ModelInfo(
        name=f.name,
        version=f.version,
        input_size=f.spec.input_size,
        preprocessing=f.spec.model_dump(),
        execution_providers=runtime.model.providers,
        batching=BatchingInfo(
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            queue_size=s.queue_size,
            request_timeout_s=s.request_timeout_s,
        ),
        metadata=f.metadata,
    )


@router.get("/healthz", response_model=Health, tags=["operations"])
async def healthz() -> Health:
    """Liveness: the process is up and answering."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
async def readyz(request: Request):
    """Readiness: the model is loaded and warmed up for every batch size."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready:
        return JSONResponse(
            Health(status="not ready", detail="model loading or shutting down").model_dump(), status_code=503
        )
    return Health(status="ready")


@router.get("/metrics", tags=["operations"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by status, latency, batch sizes, queue depth and wait."""
    m = request.app.state.metrics
    runtime = getattr(request.app.state, "runtime", None)
    m.queue_depth.set(runtime.batcher.depth if runtime else 0)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
