"""The bone-age service: ``uvicorn app.main:app`` (settings from ``BONEAGE_*`` variables)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartParser

from app import problems
from app.admission import REFUSED, Admission
from app.api import bone_age, model, page, service
from app.api.deps import require_api_key
from app.batching import Batcher
from app.config import Settings, get_settings
from app.inference import Model, ProviderUnavailable
from app.metrics import Metrics
from app.privacy import keep_patient_data_out_of_logs
from app.runtime import Runtime
from export.modelfile import ModelFileError

log = logging.getLogger("boneage")
SWAGGER_ASSETS = Path(fastapi_offline.__file__).parent / "static"

DESCRIPTION = """
Send a hand radiograph (PNG, JPEG or DICOM) and the child's sex; get the bone age in
months and years and, when the child's age is known, how far it is from it (z-score against
the Greulich & Pyle / Brush Foundation SD table, delayed / normal / advanced by ±2 SD).

Decision support and research only; not a medical device. Model: see `GET /v1/model`.
Errors are `application/problem+json`.
"""


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load and warm up the model before accepting traffic; drain the queue on shutdown."""
    settings: Settings = app.state.settings
    try:
        model = await asyncio.to_thread(Model, settings.model_path, settings.providers, settings.intra_op_threads)
    except (ModelFileError, ProviderUnavailable) as exc:
        log.error("cannot start: %s", exc)
        raise
    interval = model.file.interval
    if interval is not None and settings.interval_level > interval.max_level():
        message = (
            f"BONEAGE_INTERVAL_LEVEL={settings.interval_level} is more than this model's calibration supports "
            f"(at most {interval.max_level():.3f}, from its smallest band of validation residuals)"
        )
        log.error("cannot start: %s", message)
        raise RuntimeError(message)
    started = time.perf_counter()
    warmed = await asyncio.to_thread(model.warm_up, settings.max_batch_size)
    metrics: Metrics = app.state.metrics
    batcher = Batcher(
        model.predict,
        settings.max_batch_size,
        settings.max_wait_ms / 1000,
        on_batch=metrics.observe_batch,
    )
    pool = ThreadPoolExecutor(settings.preprocess_workers or os.cpu_count() or 1, thread_name_prefix="preprocess")
    batcher.start()
    runtime = Runtime(
        settings, model, batcher, pool, metrics, ready=True, explaining=asyncio.Semaphore(settings.explain_concurrency)
    )
    app.state.runtime = runtime
    sizes = f"1–{warmed[-1]}" if len(warmed) > 2 else " and ".join(map(str, warmed))
    log.info("ready: warmed up batch sizes %s in %.1fs", sizes, time.perf_counter() - started)
    try:
        yield
    finally:
        runtime.ready = False
        await batcher.stop()
        pool.shutdown(wait=True)
        app.state.runtime = None  # the session (hundreds of MB at larger inputs) goes with the app's lifespan
        log.info("stopped")


def _configure_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())
    keep_patient_data_out_of_logs()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Application factory: one app per settings object (tests build several)."""
    settings = settings or get_settings()
    _configure_logging(settings.log_level)
    # Keep multipart uploads in memory up to the upload limit: images are never written to disk.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max(settings.max_body_bytes.values()) + 1)

    app = FastAPI(
        title="Pediatric bone age",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        # operationId = the route function's name (bone_age, model_info…): generated clients get
        # short, stable names (client.api.bone_age.bone_age) instead of path-derived ones.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    problems.install(app)
    # The API key (and its OpenAPI security scheme) exists only when one is configured.
    protected = [Depends(require_api_key)] if settings.api_key else []
    app.include_router(bone_age.router, dependencies=protected)
    app.include_router(model.router, dependencies=protected)
    app.include_router(service.router)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=SWAGGER_ASSETS), name="static")
    # Inside the logging middleware below, so refusals (503 when full, 401 without a valid key) are
    # logged and counted like any answer.
    app.add_middleware(
        Admission,
        paths=bone_age.PREDICTION_PATHS,
        limit=settings.queue_size,
        in_flight=app.state.metrics.in_flight,
        refused=app.state.metrics.refused,
        api_key=settings.api_key,
        max_body=settings.max_body_bytes,  # the image's own limit is checked by the endpoint
    )

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        """Request id, one log line (ids, sizes, timings, status: never patient data) and metrics."""
        request.state.request_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # Answered here, so that it is logged and counted like any other answer.
            log.exception("request_id=%s unhandled error", request.state.request_id)
            response = problems.problem(
                request, 500, "Internal Server Error", "The service failed to process this request."
            )
        seconds = time.perf_counter() - started
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or request.scope.get(REFUSED, "other")
        response.headers["X-Request-ID"] = request.state.request_id
        app.state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        app.state.metrics.latency.labels(endpoint).observe(seconds)
        if endpoint.startswith("/v1"):
            log.info(
                "request_id=%s %s %s status=%d bytes_in=%s ms=%.1f",
                request.state.request_id,
                request.method,
                endpoint,
                response.status_code,
                request.headers.get("content-length", "-"),
                seconds * 1000,
            )
        return response

    if settings.cors_origins:  # Outermost: every answer carries CORS headers, refusals at the door included.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} – API",
            swagger_js_url="/static/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui.css",
            swagger_favicon_url="/static/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} – reference",
            redoc_js_url="/static/redoc.standalone.js",
            redoc_favicon_url="/static/favicon.png",
            with_google_fonts=False,  # no outside host: the page must work on a closed hospital network
        )

    return app


app = create_app()
