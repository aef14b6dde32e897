"""Every error as application/problem+json (RFC 9457), never a bare 500 for bad input."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from radiograph import ImageError

log = logging.getLogger("boneage")
PROBLEM_JSON = "application/problem+json"


class ProblemError(Exception):
    """Raise from handlers to answer with a specific status, title and detail."""

    def __init__(
        self,
        status: int,
        detail: str,
        title: str | None = None,
        headers: dict | None = None,
        type_: str = "about:blank",
        errors: list | None = None,
    ):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.type, self.errors = status, detail, headers, type_, errors
        self.title = title or HTTPStatus(status).phrase


def problem(
    request: Request,
    status: int,
    title: str,
    detail: str,
    headers: dict | None = None,
    errors: list | None = None,
    type_: str = "about:blank",
) -> JSONResponse:
    body = {
        "type": type_,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None),
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_errors(exc: RequestValidationError) -> list[dict]:
    # Only location, message and type: never echo the submitted value (it may be patient data).
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem(request, exc.status, exc.title, exc.detail, exc.headers, exc.errors, exc.type)

    @app.exception_handler(ImageError)
    async def _image(request: Request, exc: ImageError):
        return problem(request, exc.status, exc.title, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = _field_errors(exc)
        detail = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in errors)
        return problem(request, 422, "Invalid request", detail or "The request is invalid.", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        title = HTTPStatus(exc.status_code).phrase
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem(request, exc.status_code, title, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return problem(request, 500, "Internal Server Error", "The service failed to process this request.")
