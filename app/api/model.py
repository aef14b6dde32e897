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
        metadata={k: v for k, v in f.metadata.items() if k not in ("interval", "gate")},
        interval=None
        if f.interval is None
        else {
            "level": s.interval_level,
            "method": f.metadata["interval"].get("method"),
            "validation_images": f.metadata["interval"].get("validation_images"),
            "bands": f.interval.bands(),
        },
        gate=None
        if f.gate is None
        else {
            "method": f.metadata["gate"].get("method"),
            "threshold": f.gate.threshold,
            "percentile": f.gate.percentile,
            "components": int(f.gate.components.shape[0]),
            "training_images": f.metadata["gate"].get("training_images"),
            "action": s.out_of_distribution,
        },
    )
