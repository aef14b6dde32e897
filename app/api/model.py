"""GET /v1/model: what is being served, read from the model file itself."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import RuntimeDep
from app.schemas import BatchingInfo, ModelInfo

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo, tags=["model"])
async def model_info(runtime: RuntimeDep) -> ModelInfo:
    """The served model: metadata from its file, input size, execution providers and batching."""
    s, f = runtime.settings, runtime.model.file
    calibration = f.calibration_summary()
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
        metadata=f.public_metadata(),
        interval=None if f.interval is None else {"level": s.interval_level, **calibration["interval"]},
        gate=None if f.gate is None else {**calibration["gate"], "action": s.out_of_distribution},
    )
