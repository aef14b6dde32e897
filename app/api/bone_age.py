"""POST /v1/bone-age (multipart), /v1/bone-age/json (base64) and /v1/bone-age/explain (heatmap): the product."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from app import assessment, explain, quality
from app.api.deps import RuntimeDep
from app.batching import BatchFailed
from app.formats import dicom, fhir
from app.inference import Prediction
from app.patient import patient_facts
from app.problems import ProblemError
from app.runtime import Runtime
from app.schemas import (
    MAX_AGE_MONTHS,
    BoneAgeJsonRequest,
    BoneAgeResponse,
    ExplainResponse,
    Explanation,
    Interval,
    ModelRef,
    Problem,
    Sex,
    SexIn,
)
from radiograph import DecodedImage, load_model_input

router = APIRouter(prefix="/v1", tags=["bone age"])
PREDICTION_PATHS = frozenset(
    {"/v1/bone-age", "/v1/bone-age/json", "/v1/bone-age/explain"}
)  # Admission control counts these.


def content_type(expected: str):
    """Dependency: answer 415 (not a confusing 422) when the body is not of the endpoint's type."""

    def check(request: Request) -> None:
        if not request.headers.get("content-type", "").lower().startswith(expected):
            raise ProblemError(
                415,
                f"Send {expected}: multipart/form-data with an 'image' file to /v1/bone-age, "
                "or application/json with a base64 'image' to /v1/bone-age/json.",
                "Unsupported content type",
            )

    return Depends(check)


ERRORS: dict = {
    status: {"model": Problem, "content": {"application/problem+json": {}}, "description": text}
    for status, text in {
        400: "The image cannot be read (not an image, truncated, blank, bad base64).",
        401: "Missing or wrong X-API-Key (only when the service requires one).",
        413: "Upload or image larger than the service accepts.",
        415: "A real image in a format the service does not read (GIF, colour DICOM, 12-bit JPEG Extended DICOM).",
        422: "Invalid or missing field (e.g. sex, when the image does not carry it); or, with problem type "
        f"`{quality.PROBLEM_TYPE}`, an image the model cannot rate (a photograph, or unlike the children's hand "
        "radiographs it was trained on).",
        503: "Not ready, or overloaded: retry after the Retry-After seconds.",
        504: "The request waited longer than the service's deadline.",
    }.items()
}
ANSWERS = {
    **ERRORS,
    200: {
        "description": "The bone age; as a FHIR R4 Observation (LOINC 85151-9) with `Accept: application/fhir+json` "
        "or `?format=fhir`.",
        "content": {
            fhir.MEDIA_TYPE: {"schema": {"type": "object", "description": "FHIR Observation"}},
            dicom.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary", "description": "DICOM SR"}},
        },
    },
}
FormatQuery = Annotated[
    Literal["json", "fhir", "dicom-sr"],
    Query(
        description="`fhir`: a FHIR Observation (as does `Accept: application/fhir+json`); `dicom-sr`: a DICOM "
        "Structured Report in the uploaded DICOM's study (DICOM uploads only)."
    ),
]


ImageFile = Annotated[
    UploadFile,
    # OpenAPI 3.1 says "binary" with contentMediaType alone; generated clients (openapi-python-client,
    # openapi-generator) only send a file part when the property also says format: binary.
    File(description="Hand radiograph: PNG, JPEG or DICOM.", json_schema_extra={"format": "binary"}),
]
SexForm = Annotated[
    SexIn | None,
    Form(description="male or female (M/F and other cases accepted); optional for a DICOM with PatientSex."),
]
AgeForm = Annotated[float | None, Form(gt=0, le=MAX_AGE_MONTHS, description="Optional; read from a DICOM if absent.")]


async def _early_source(runtime: Runtime, data: bytes, format_: str):
    """For a DICOM result, the upload's header, read before any inference (a PNG is refused at once)."""
    if format_ != "dicom-sr":
        return None
    return await asyncio.get_running_loop().run_in_executor(runtime.pool, _source, data)


async def _answer(
    runtime: Runtime, answer: BoneAgeResponse, request: Request, format_: str, source
) -> BoneAgeResponse | Response:
    """The plain answer, or the same answer as a FHIR Observation or DICOM SR when the client asks for one."""
    if format_ == "dicom-sr":
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(runtime.pool, _report, answer, source)
        return Response(report, media_type=dicom.MEDIA_TYPE, headers=_attachment("bone-age-sr.dcm"))
    if format_ == "fhir" or fhir.MEDIA_TYPE in request.headers.get("accept", ""):
        return JSONResponse(fhir.observation(answer), media_type=fhir.MEDIA_TYPE)
    return answer


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


def _source(data: bytes):
    try:
        return dicom.source_header(data)
    except dicom.NotDicom as exc:
        raise ProblemError(422, str(exc), "DICOM result needs a DICOM upload") from None


def _report(answer: BoneAgeResponse, source) -> bytes:
    if answer.warnings:  # only in warn mode: an image the model cannot rate gets no record entry
        raise ProblemError(
            422,
            "No DICOM SR for an image flagged as one the model cannot rate: " + " ".join(answer.warnings),
            "DICOM result not possible",
            type_=quality.PROBLEM_TYPE,
        )
    return _built(lambda: dicom.structured_report(answer, source))


def _capture(overlay, answer: BoneAgeResponse, source) -> bytes:
    return _built(lambda: dicom.secondary_capture(overlay, source, answer))


def _built(build) -> bytes:
    """A DICOM result, or a 422 when the upload's header lacks what one needs (no header values quoted)."""
    try:
        return dicom.to_bytes(build())
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ProblemError(
            422,
            f"This DICOM's header lacks what a DICOM result needs ({type(exc).__name__}); use the JSON or FHIR answer.",
            "DICOM result not possible",
        ) from None


async def _predict_copies(runtime: Runtime, copies: np.ndarray, sex: float) -> list[Prediction]:
    """The occluded copies through the batcher as background work, a few at a time: other clients'
    requests go ahead of them and wait for one small batch at most. On a failure or timeout the
    copies not yet run are cancelled, not left to the model."""
    timeout = runtime.settings.request_timeout_s
    deadline = time.monotonic() + timeout
    step = runtime.settings.explain_batch_size
    results: list[Prediction] = []
    for i in range(0, len(copies), step):
        tasks = [
            asyncio.ensure_future(
                runtime.batcher.submit(c, sex, max(deadline - time.monotonic(), 0.001), background=True)
            )
            for c in copies[i : i + step]
        ]
        try:
            results += await asyncio.gather(*tasks)
        except TimeoutError:
            raise ProblemError(504, f"The explanation took longer than {timeout:g} s.", "Timed out") from None
        except BatchFailed:
            raise ProblemError(503, "Inference failed while explaining; retry.", "Explanation failed") from None
        finally:
            for task in tasks:
                task.cancel()  # no-op for those done; the others leave the queue unanswered
    return results


def _patient_facts(decoded: DecodedImage, requested: Sex | None, age: float | None):
    """Sex and age from the request, else from the DICOM (:mod:`app.patient`); 422 when there is no sex."""
    facts = patient_facts(decoded, requested, age)
    if facts.sex is None:
        raise ProblemError(
            422,
            "sex is required: send 'male' or 'female' (this image does not carry the patient's sex).",
            "Missing sex",
        )
    return facts.sex, facts.sex_source, facts.age_months, facts.age_source, facts.notes


@dataclass(frozen=True)
class _Assessed:
    answer: BoneAgeResponse
    tensor: np.ndarray  # the model input, for an explanation
    sex: float  # the model's sex input (male = 1)
    months: float  # the prediction before rounding (the heatmap's baseline)


async def _assess(runtime: Runtime, request: Request, data: bytes, sex: Sex | None, age: float | None) -> _Assessed:
    """Shared by every endpoint: decode + preprocess in the pool, batch, assess."""
    settings = runtime.settings
    if len(data) > settings.max_upload_bytes:
        raise ProblemError(
            413, f"The image is {len(data):,} bytes; the limit is {settings.max_upload_bytes:,}.", "Upload too large"
        )
    with runtime.batcher.expect() as expected:
        loop = asyncio.get_running_loop()
        tensor, decoded = await loop.run_in_executor(
            runtime.pool, load_model_input, data, runtime.model.spec, settings.max_pixels
        )
        used_sex, sex_source, age, age_source, notes = _patient_facts(decoded, sex, age)
        findings = quality.file_findings(decoded)
        _refuse_if(findings, runtime)
        sex_input = 1.0 if used_sex == "male" else 0.0
        try:
            prediction: Prediction = await runtime.batcher.submit(
                tensor, sex_input, settings.request_timeout_s, expected
            )
        except TimeoutError:
            raise ProblemError(504, f"No result within {settings.request_timeout_s:g} s.", "Timed out") from None
        except BatchFailed:
            if not runtime.batcher.alive:
                raise ProblemError(503, "The service's batcher has stopped; it is not ready.", "Not ready") from None
            raise ProblemError(500, "Inference failed for this request's batch; retry.", "Inference failed") from None
    findings += quality.feature_findings(prediction.distance, runtime.model.file.gate)
    _refuse_if(findings, runtime)
    months, level = prediction.months, settings.interval_level
    calibration = runtime.model.file.interval
    interval = calibration.interval(months, level) if calibration is not None else None
    result = None
    if age is not None:
        a = assessment.assess(months, age, used_sex, interval, level)
        result = {**a.__dict__, "sd_source": assessment.SD_SOURCE, "sd_method": assessment.SD_METHOD}
    answer = BoneAgeResponse(
        request_id=request.state.request_id,
        bone_age_months=round(months, 1),
        bone_age_years=round(months / 12, 1),
        bone_age_interval_months=None
        if interval is None
        else Interval(lower=round(interval[0], 1), upper=round(interval[1], 1), level=level),
        bone_age_interval_years=None
        if interval is None
        else Interval(lower=round(interval[0] / 12, 1), upper=round(interval[1] / 12, 1), level=level),
        sex=used_sex,
        sex_source=sex_source,
        chronological_age_months=None if age is None else round(age, 2),
        chronological_age_source=age_source,
        assessment=result,
        model=ModelRef(name=runtime.model.file.name, version=runtime.model.file.version),
        notes=notes,
        warnings=findings,
    )
    return _Assessed(answer, tensor, sex_input, months)


def _refuse_if(findings: list[str], runtime: Runtime) -> None:
    """Refuse an image the model cannot rate (the default), unless the service is set to warn."""
    if findings and runtime.settings.out_of_distribution == "refuse":
        runtime.metrics.out_of_distribution.inc()
        raise ProblemError(422, " ".join(findings), quality.PROBLEM_TITLE, type_=quality.PROBLEM_TYPE)


@router.post(
    "/bone-age", response_model=BoneAgeResponse, responses=ANSWERS, dependencies=[content_type("multipart/form-data")]
)
async def bone_age(
    runtime: RuntimeDep,
    request: Request,
    image: ImageFile,
    sex: SexForm = None,
    chronological_age_months: AgeForm = None,
    format: FormatQuery = "json",
) -> BoneAgeResponse | JSONResponse:
    """Bone age from an uploaded radiograph (multipart form)."""
    data = await image.read(runtime.settings.max_upload_bytes + 1)
    source = await _early_source(runtime, data, format)
    assessed = await _assess(runtime, request, data, sex, chronological_age_months)
    return await _answer(runtime, assessed.answer, request, format, source)


def parse_json_request(raw: bytes) -> tuple[bytes, BoneAgeJsonRequest]:
    """Raw JSON body → (image bytes, request fields). Runs in the worker pool, not on the event loop.

    A large upload's JSON parse, validation and base64 decode take tens of milliseconds; on the loop
    that drives batching they would stall every other request for that long.
    """
    try:
        body = BoneAgeJsonRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_input=False)]
        raise RequestValidationError(errors) from None
    try:
        data = base64.b64decode(body.image, validate=True)
    except (binascii.Error, ValueError):
        raise ProblemError(400, "'image' is not valid base64.", "Bad base64") from None
    return data, body


@router.post(
    "/bone-age/json",
    response_model=BoneAgeResponse,
    responses=ANSWERS,
    dependencies=[content_type("application/json")],
    # The body is parsed off the event loop (parse_json_request), so its schema is declared here.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": BoneAgeJsonRequest.model_json_schema()}},
        }
    },
)
async def bone_age_json(
    runtime: RuntimeDep, request: Request, format: FormatQuery = "json"
) -> BoneAgeResponse | JSONResponse:
    """Bone age from a base64-encoded radiograph in a JSON body."""
    raw = await request.body()
    loop = asyncio.get_running_loop()
    data, body = await loop.run_in_executor(runtime.pool, parse_json_request, raw)
    source = await _early_source(runtime, data, format)
    assessed = await _assess(runtime, request, data, body.sex, body.chronological_age_months)
    return await _answer(runtime, assessed.answer, request, format, source)


@router.post(
    "/bone-age/explain",
    response_model=ExplainResponse,
    responses={
        **ERRORS,
        200: {
            "description": "Bone age and heatmap; with `?format=dicom-sc`, the overlay as a DICOM Secondary Capture.",
            "content": {dicom.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
    },
    dependencies=[content_type("multipart/form-data")],
)
async def explain_bone_age(
    runtime: RuntimeDep,
    request: Request,
    image: ImageFile,
    sex: SexForm = None,
    chronological_age_months: AgeForm = None,
    grid: Annotated[int, Form(ge=4, le=16, description="Squares per side of the occlusion grid.")] = 8,
    format: Annotated[
        Literal["json", "dicom-sc"],
        Query(description="`dicom-sc`: the overlay as a DICOM Secondary Capture in the uploaded DICOM's study."),
    ] = "json",
) -> ExplainResponse | Response:
    """Bone age with a heatmap of the squares that moved it (occlusion sensitivity).

    Costs grid² + 1 model inputs (65 at the default 8 × 8); the copies are queued together in the
    service's batcher and share batches with other requests. A qualitative aid, not evidence.
    """
    data = await image.read(runtime.settings.max_upload_bytes + 1)
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    source = await loop.run_in_executor(runtime.pool, _source, data) if format == "dicom-sc" else None
    assessed = await _assess(runtime, request, data, sex, chronological_age_months)
    async with runtime.explaining:
        copies = await loop.run_in_executor(runtime.pool, explain.occluded_copies, assessed.tensor, grid)
        results = await _predict_copies(runtime, copies, assessed.sex)
    heat = explain.heatmap(assessed.months, np.array([r.months for r in results]), grid)
    overlay = await loop.run_in_executor(runtime.pool, explain.overlay_rgb, assessed.tensor, heat)
    if format == "dicom-sc":
        capture = await loop.run_in_executor(runtime.pool, _capture, overlay, assessed.answer, source)
        return Response(capture, media_type=dicom.MEDIA_TYPE, headers=_attachment("bone-age-heatmap-sc.dcm"))
    return ExplainResponse(
        bone_age=assessed.answer,
        explanation=Explanation(
            method=explain.METHOD,
            caveat=explain.CAVEAT,
            grid=grid,
            change_months=[[round(float(v), 2) for v in row] for row in heat.change_months],
            input_png_base64=await loop.run_in_executor(
                runtime.pool, explain.png_base64, explain.as_rgb(assessed.tensor)
            ),
            overlay_png_base64=await loop.run_in_executor(runtime.pool, explain.png_base64, overlay),
            model_inputs=len(copies) + 1,
            seconds=round(time.perf_counter() - started, 3),
        ),
    )
