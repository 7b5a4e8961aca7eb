"""The FastAPI application: routes, one error shape for every failure, a body size limit."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.routes import artifacts, health, jobs
from gralora.errors import GraloraError
from service.db import session_scope
from service.errors import http_status_for
from service.jobs import get_limits
from service.keys import authenticate

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
    413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "too_many_requests",
}

# Errors that mean the database cannot be reached (503), not that a request is wrong.
DATABASE_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError)

# What FastAPI says when reading a JSON body fails for a reason other than a syntax error.
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"

DESCRIPTION = """Train GraLoRA adapters over REST.

Every route but `/healthz`, `/readyz`, `/metrics`, `/docs` and `/openapi.json` needs
`Authorization: Bearer <key>`.
Errors always look like `{"error": {"code": "...", "message": "...", "field": "..."}}`.
"""


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one error shape."""
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _first_error(errors: Sequence[Any]) -> dict[str, Any]:
    """The error to report: an unknown field first (the likeliest typo), else the first one."""
    for error in errors:
        if error.get("type") == "extra_forbidden":
            return dict(error)
    return dict(errors[0]) if errors else {}


def _key_refusal(request: Request) -> JSONResponse | None:
    """The 401 (or 503) a request gets when its key does not work, else None."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("Authorization"))
    try:
        with session_scope() as session:
            known = scheme.lower() == "bearer" and authenticate(session, credentials) is not None
    except DATABASE_ERRORS:
        return error_response(503, "database_unavailable",
                              "the database is unreachable; retry in a few seconds",
                              headers={"Retry-After": "5"})
    if known:
        return None
    return error_response(401, "unauthorized", "the API key is missing, unknown or revoked",
                          headers={"WWW-Authenticate": "Bearer"})


async def _invalid_json(request: Request) -> JSONResponse:
    # FastAPI reads the body before it runs the key check, so check the key here: a caller
    # without a working key learns nothing about how its body was read.
    refusal = await run_in_threadpool(_key_refusal, request)
    return refusal or error_response(400, "invalid_json", "the request body is not valid JSON")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return await _invalid_json(request)
    if any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes)
           for e in errors):
        # FastAPI only parses JSON bodies sent as application/json; anything else stays bytes.
        return error_response(415, "unsupported_media_type",
                              "send the body as JSON with 'Content-Type: application/json'")
    first = _first_error(errors)
    loc = tuple(first.get("loc", ()))
    field = _field_of(loc)
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return error_response(422, "unknown_field", f"unknown field {field!r}", field)
    if kind == "missing" and loc in (("body",), ()):
        return error_response(422, "invalid_request", "a JSON request body is required")
    if kind == "missing":
        return error_response(422, "invalid_request", f"{field} is required", field)
    if kind == "model_attributes_type" or (loc == ("body",)):
        return error_response(422, "invalid_request", "the request body must be a JSON object")
    message = str(first.get("msg", "invalid value"))
    return error_response(422, "invalid_request", f"{field}: {message}" if field else message,
                          field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 400 and message == FASTAPI_BODY_PARSE_ERROR:
        # Not UTF-8, nested too deeply, a number too long to read...
        return await _invalid_json(request)
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _domain_error(request: Request, exc: GraloraError) -> JSONResponse:
    status = http_status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, exc.code, exc.message, exc.field, headers=headers)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", type(exc).__name__)
    return error_response(503, "database_unavailable",
                          "the database is unreachable; retry in a few seconds",
                          headers={"Retry-After": "5"})


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # A value the database refused (out of range, bad encoding) that a check let through.
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                type(exc).__name__)
    return error_response(422, "invalid_request", "a value in the request cannot be stored")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "an unexpected error occurred; try again later")


class BodySizeLimit:
    """Answer 413 when a request body exceeds the limit (declared or streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = get_limits().max_request_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False
            if too_large:
                await _too_large(limit)(scope, receive, send)
                return
        # Buffer the body (at most `limit` bytes) so a chunked upload is bounded too.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(limit)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, "request_too_large",
                          f"the request body is larger than {limit} bytes")


def create_app() -> FastAPI:
    """A new API application."""
    app = FastAPI(title="GraLoRA fine-tuning service", version="1.0.0", description=DESCRIPTION)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(GraloraError, _domain_error)  # type: ignore[arg-type]
    for db_error in DATABASE_ERRORS:
        app.add_exception_handler(db_error, _database_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(BodySizeLimit)
    return app
